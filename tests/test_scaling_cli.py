"""`forerun scale`: bad arguments fail before a model loads; on a tiny model the run writes
results.json, report.md and plots with the account per strategy and budget."""
import dataclasses
import json
from collections import Counter

import pytest
from conftest import StubTokenizer, tiny_runtime

from forerun import LLM
from forerun.cli import build_parser, main
from forerun.config import EngineConfig, SpecConfig
from forerun.scaling.arguments import solver_factory, strategies_from_args
from forerun.scaling.cli import run_scale
from forerun.scaling.report import write_results
from forerun.scaling.tasks import NumericTask, Problem


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "nope"], "unknown strategy"),
    (["--strategy", "best-of-n"], "need a scorer"),
    (["--n", "0"], "budgets must be >= 1"),
    (["--n", "a,b"], "integers"),
    (["--strategy-opt", "beam.width=2"], "not in --strategy"),
    (["--strategy", "beam", "--reward", "ptrue", "--strategy-opt", "beam.depth=2"], "no option 'depth'"),
    (["--task", "humaneval", "--data", "x.jsonl"], "--data"),
    (["--task", "gsm8k", "--data", "/nonexistent.jsonl"], "no GSM8K file"),
])
def test_bad_arguments_fail_before_the_model_loads(argv, message, capsys):
    base = ["scale", "--task", "arith"] if "--task" not in argv else ["scale"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_task_is_an_argparse_error():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scale", "--task", "mmlu"])


def test_a_run_on_a_tiny_model_writes_results_report_and_plots(tmp_path):
    rt = dataclasses.replace(tiny_runtime(seed=5), tokenizer=StubTokenizer())
    llm = LLM(runtime=rt, engine=EngineConfig(kv_cache_tokens=8192))
    task = NumericTask("digits", [Problem(f"p{i}", " ".join(str(3 + i + j) for j in range(20)), str(7 + i))
                                  for i in range(3)])
    args = build_parser().parse_args(["scale", "--task", "arith", "--strategy", "sample,vote,adaptive",
                                      "--n", "1,4", "--max-new-tokens", "5", "--temperature", "1.0",
                                      "--no-progress", "--strategy-opt", "adaptive.wave=2"])
    saved_so_far = []
    results = run_scale(llm, task, task.problems(), strategies_from_args(args), [1, 4], args, saved_so_far.append)
    assert len(saved_so_far) == 3 * 2 and len(saved_so_far[0]["runs"]) == 1  # after each strategy and budget
    assert saved_so_far[-1]["runs"] == results["runs"]
    results["command"] = "test"
    paths = write_results(results, tmp_path)
    assert {p.name for p in paths} == {"results.json", "report.md", "accuracy_vs_tokens.png", "coverage.png"}
    saved = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["strategy"], r["budget"]): r for r in saved["runs"]}
    assert set(runs) == {(s, n) for s in ("sample", "vote", "adaptive") for n in (1, 4)}
    vote, sample = runs["vote", 4], runs["sample", 4]
    # budget 4 ran first; every later run draws the same seeded samples of a question, so they were kept:
    # vote repeats sample's 4 candidates and its account counts what they cost when decoded
    assert sample["replayed"] == 0 and runs["sample", 1]["replayed"] == 3 and vote["replayed"] == 3 * 4
    assert [[c["text"] for c in q["candidates"]] for q in vote["questions"]] == \
        [[c["text"] for c in q["candidates"]] for q in sample["questions"]]
    assert vote["generated_tokens"] == 3 * 4 * 5  # no EOS in a tiny model: every sample runs to the limit
    # each 20-token prompt was computed once (the last token is the first decode row); 3 forks share it
    assert vote["prefill_tokens"] == sample["prefill_tokens"] == 3 * (20 - 1)
    assert vote["cached_tokens"] == 3 * 3 * 20
    assert vote["engine_steps"] == 0 and sample["engine_steps"] > 0  # nothing was decoded again
    # adaptive's first wave (2 samples) is the same first request: kept; its second wave is new
    assert runs["adaptive", 4]["replayed"] == 3 * 2 and runs["adaptive", 4]["engine_steps"] > 0
    for key in ("accuracy", "target_forwards", "wall_s", "elapsed_s"):
        assert key in vote
    q = vote["questions"][0]
    assert len(q["candidates"]) == 4 and {"answer", "correct", "text", "tokens"} <= set(q["candidates"][0])
    votes = Counter(c["answer"] for c in q["candidates"] if c["answer"] is not None)
    assert votes[q["answer"]] == max(votes.values())  # the vote's answer is a most frequent one
    correct = [[c["correct"] for c in q["candidates"]] for q in runs["sample", 4]["questions"]]
    assert saved["coverage"]["pass_at_k"][-1] == pytest.approx(sum(any(c) for c in correct) / 3)
    assert "| vote | 4 |" in (tmp_path / "report.md").read_text()


def test_questions_answered_at_once_give_the_answers_of_one_at_a_time():
    rt = dataclasses.replace(tiny_runtime(seed=5), tokenizer=StubTokenizer())
    task = NumericTask("digits", [Problem(f"p{i}", " ".join(str(3 + i + j) for j in range(20)), str(7 + i))
                                  for i in range(6)])
    seen = []
    for concurrency in ("1", "3"):
        llm = LLM(runtime=rt, engine=EngineConfig(kv_cache_tokens=8192))
        args = build_parser().parse_args(["scale", "--task", "arith", "--strategy", "vote,beam,best-of-n",
                                          "--reward", "mean-logprob", "--n", "2,3", "--max-new-tokens", "6",
                                          "--temperature", "1.0", "--delimiter", "9", "--max-steps", "2",
                                          "--no-progress", "--concurrency", concurrency])
        results = run_scale(llm, task, task.problems(), strategies_from_args(args), [2, 3], args)
        seen.append([(r["strategy"], r["budget"], r["generated_tokens"], r["target_forwards"],
                      [(q["answer"], q["chosen"], [c["text"] for c in q["candidates"]]) for q in r["questions"]])
                     for r in results["runs"]])
        assert all(r["elapsed_s"] > 0 for r in results["runs"])
    assert seen[0] == seen[1]


def test_the_samples_decode_with_the_speculation_flags():
    """scale takes generate's speculation flags (drafter options through --opt), so any method can
    decode its samples."""
    args = build_parser().parse_args(["scale", "--task", "arith", "--method", "retrieval", "--num-draft", "3",
                                      "--opt", "datastore=DS", "--opt", "depth=3"])
    rt = dataclasses.replace(tiny_runtime(seed=5), tokenizer=StubTokenizer())
    task = NumericTask("digits", [Problem("p0", "3 4 5", "7")])
    make = solver_factory(LLM(runtime=rt, engine=EngineConfig(kv_cache_tokens=8192)), task, args)
    assert make(None).generator.spec == SpecConfig(method="retrieval", num_draft=3, adaptive=False,
                                                   options={"datastore": "DS", "depth": "3"})

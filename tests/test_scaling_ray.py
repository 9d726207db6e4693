"""`forerun scale --ray`: a local two-worker Ray instance gives the answers of a single-process run."""
import functools

import pytest
from scripted import digits_task, tiny_llm

from forerun.cli import build_parser
from forerun.scaling.arguments import strategies_from_args
from forerun.scaling.cli import run_scale

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")


def _answers(results):
    return [(r["strategy"], r["budget"], r["accuracy"],
             [(q["id"], q["answer"], q["chosen"], [c["text"] for c in q["candidates"]]) for q in r["questions"]])
            for r in results["runs"]]


def _scores(results):
    return [c["score"] or 0.0 for r in results["runs"] for q in r["questions"] for c in q["candidates"]]


def test_two_ray_workers_answer_as_one_process():
    import torch

    from forerun.scaling.distributed import evaluate_on_ray

    args = build_parser().parse_args(["scale", "--task", "arith", "--strategy", "vote,particles", "--n", "1,3",
                                      "--reward", "sum-logprob", "--max-new-tokens", "4", "--temperature", "1.0",
                                      "--delimiter", "7", "--max-steps", "2", "--no-progress"])
    task = digits_task(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each actor (Ray gives it one CPU): the same float reductions
    try:
        single = run_scale(tiny_llm(), task, task.problems(), strategies_from_args(args), [1, 3], args)
    finally:
        torch.set_num_threads(threads)
    spread = evaluate_on_ray(args, 5, 2, make_llm=tiny_llm, make_task=functools.partial(digits_task, 5))
    assert _answers(spread) == _answers(single)
    assert _scores(spread) == pytest.approx(_scores(single), abs=1e-4)
    assert spread["runs"][0]["generated_tokens"] == single["runs"][0]["generated_tokens"]

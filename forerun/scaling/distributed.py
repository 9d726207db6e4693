"""`forerun scale --ray [ADDRESS]`: the questions spread over Ray actors, each holding its own engine.

Every random stream derives from (seed, question), never from what a process answered before, so
the answers, candidates and scores are those of a single-process run; only the accounts differ
(each actor's prefix cache sees its own questions). Questions are dealt round-robin; the records come
back in the original order.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


class Worker:
    """One Ray actor: an engine, the task and the strategies, built from the CLI's arguments."""

    def __init__(self, args: dict, make_llm: Callable | None = None, make_task: Callable | None = None):
        from forerun.scaling.arguments import load_llm, solver_factory, strategies_from_args
        from forerun.scaling.run import Run
        from forerun.scaling.tasks import build_task

        a = argparse.Namespace(**args)
        self.a = a
        self.task = make_task() if make_task else build_task(a.task, a.data, a.count, a.seed)
        self.runs = [Run(s) for s in strategies_from_args(a)]
        self.solver_for = solver_factory(make_llm() if make_llm else load_llm(a), self.task, a)

    def answer(self, indices: list[int], budgets: list[int]) -> list[tuple[str, int, list]]:
        from forerun.scaling.run import answer

        problems = self.task.problems(self.a.limit)
        return answer(self.task, [problems[i] for i in indices], self.runs, budgets, self.solver_for,
                      concurrency=self.a.concurrency)


def evaluate_on_ray(a: argparse.Namespace, count: int, workers: int, address: str | None = None,
                    make_llm: Callable | None = None, make_task: Callable | None = None) -> dict:
    """results.json's dict, answered by `workers` actors on a local Ray instance (address None) or a cluster."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install ray") from None
    from forerun.scaling.arguments import parse_budgets
    from forerun.scaling.run import assemble

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    budgets = parse_budgets(a.n)
    started = not ray.is_initialized()
    if started:
        # local workers import forerun (and a test's helpers) from the driver's path
        env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        ray.init(address=address, num_cpus=workers if address is None else None, include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        actor = ray.remote(num_cpus=1)(Worker)
        actors = [actor.remote(vars(a), make_llm, make_task) for _ in range(workers)]
        shards = [list(range(i, count, workers)) for i in range(workers)]
        parts = ray.get([w.answer.remote(shard, budgets) for w, shard in zip(actors, shards) if shard])
    finally:
        if started:
            ray.shutdown()
    return assemble(a.task, count, budgets, _merge(parts, [s for s in shards if s], count))


def _merge(parts: list[list[tuple]], shards: list[list[int]], count: int) -> list:
    """Each actor's records (same runs and budgets, its own questions) -> one list in question order."""
    merged = []
    for k, (name, n, _, _) in enumerate(parts[0]):
        questions = [None] * count
        for part, shard in zip(parts, shards):
            for index, record in zip(shard, part[k][2]):
                questions[index] = record
        merged.append((name, n, questions, max(part[k][3] for part in parts)))  # the actors ran side by side
    return merged

"""Answering questions with a strategy, and evaluating strategies across budgets on a task.

    outcome = solve(strategy, solver, question, n)     # the answer and its exact account
    results = evaluate(task, problems, runs, budgets, solver_for)   # the dict results.json holds

With concurrency > 1, that many questions are answered at once by threads, each with its own solver
(solver_for is called once per thread), so their requests share the engine's batches. A question's
account is still its own, except engine_steps and wall_s, which overlap with the questions answered
beside it; each run's `elapsed_s` is the real time it took.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from forerun.scaling.passk import pass_at_k
from forerun.scaling.strategies import Solver, Strategy
from forerun.scaling.tasks import Problem, Task
from forerun.scaling.types import Account, Outcome


def solve(strategy: Strategy, solver: Solver, question: str, n: int, problem_id: str = "") -> Outcome:
    """Run one strategy on one question; the outcome's account is what this call cost (the
    generator's account grows by the same amount). The generator keys its random streams and kept
    samples by problem_id when given (two problems may ask the same question), else by the question."""
    if strategy.needs_scorer and solver.scorer is None:
        raise ValueError(f"strategy {strategy.name!r} needs a scorer (--reward)")
    before, start = solver.generator.account.copy(), time.perf_counter()
    outcome = strategy.run(solver, solver.generator.query(question, problem_id), n)
    outcome.account = solver.generator.account.minus(before)
    outcome.account.wall_s = time.perf_counter() - start
    return outcome


@dataclass(frozen=True)
class Run:
    """One strategy (with its options) to evaluate at every budget."""

    strategy: Strategy
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.strategy.name


@dataclass
class Checker:
    """task.check with a memory: a candidate text is checked once (HumanEval runs it in the sandbox)."""

    task: Task
    seen: dict = field(default_factory=dict)

    def __call__(self, problem: Problem, text: str) -> bool:
        key = (problem.id, text)
        if key not in self.seen:
            self.seen[key] = self.task.check(problem, text)
        return self.seen[key]


def evaluate(task: Task, problems: list[Problem], runs: list[Run], budgets: list[int],
             solver_for: Callable[[Strategy], Solver], progress: Callable | None = None,
             concurrency: int = 1, partial: Callable[[dict], None] | None = None) -> dict:
    """Every run at every budget on every problem. `progress(iterable, desc, total)` wraps the loop (tqdm);
    `partial(results)` receives the results so far after each run at each budget (to save them)."""
    def finished(records: list[Record]) -> None:
        if partial is not None:
            partial(assemble(task.name, len(problems), sorted({r[1] for r in records}), records))

    records = answer(task, problems, runs, budgets, solver_for, progress, concurrency, finished)
    return assemble(task.name, len(problems), budgets, records)


Record = tuple[str, int, list, float]  # run name, budget, one record per problem, elapsed seconds


def answer(task: Task, problems: list[Problem], runs: list[Run], budgets: list[int],
           solver_for: Callable[[Strategy], Solver], progress: Callable | None = None,
           concurrency: int = 1, finished: Callable[[list[Record]], None] | None = None) -> list[Record]:
    """A Record for every run and budget, in that order. The largest budget runs first, so the
    smaller ones can take their whole-solution samples from what the generator kept."""
    if not problems:
        raise ValueError("no problems to evaluate")
    if not budgets or min(budgets) < 1:
        raise ValueError(f"budgets must be >= 1, got {budgets}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    check, local, records = Checker(task), threading.local(), []

    def one(run: Run, problem: Problem, n: int) -> dict:
        solvers = local.__dict__.setdefault("solvers", {})  # this thread's solver per run
        if id(run) not in solvers:
            solvers[id(run)] = solver_for(run.strategy)
        outcome = solve(run.strategy, solvers[id(run)], problem.question, n, problem.id)
        return _question_record(problem, outcome, check)

    with ThreadPoolExecutor(concurrency, thread_name_prefix="question") as pool:
        for run in runs:
            done = {}
            for n in sorted(set(budgets), reverse=True):
                start = time.perf_counter()
                answers = pool.map(lambda p: one(run, p, n), problems)
                if progress is not None:
                    answers = progress(answers, f"{run.name} n={n}", len(problems))
                done[n] = (list(answers), time.perf_counter() - start)
                if finished is not None:
                    finished(records + [(run.name, m, *done[m]) for m in budgets if m in done])
            records += [(run.name, n, *done[n]) for n in budgets]
    return records


def assemble(task_name: str, count: int, budgets: list[int], records: list[Record]) -> dict:
    """results.json's dict from answer()'s records (of one process, or merged from several)."""
    rows = [_summary(name, n, questions, elapsed) for name, n, questions, elapsed in records]
    return {"task": task_name, "problems": count, "budgets": budgets, "runs": rows, "coverage": coverage_curve(rows)}


def _question_record(problem: Problem, outcome: Outcome, check: Checker) -> dict:
    candidates = [{"answer": c.answer, "correct": check(problem, c.text), "score": c.score, "tokens": c.tokens,
                   "text": c.text} for c in outcome.candidates]
    chosen = outcome.chosen
    return {"id": problem.id, "reference": problem.reference if problem.entry_point is None else None,
            "answer": outcome.answer, "correct": bool(chosen) and check(problem, chosen.text),
            "chosen": chosen.text if chosen else None, "candidates": candidates,
            "account": outcome.account.to_dict(), "notes": outcome.notes}


def _summary(name: str, n: int, questions: list[dict], elapsed: float) -> dict:
    total = Account()
    for q in questions:
        total.add(Account(**q["account"]))
    count = len(questions)
    return {"strategy": name, "budget": n, "accuracy": sum(q["correct"] for q in questions) / count,
            "generated_tokens": total.generated_tokens, "prefill_tokens": total.prefill_tokens,
            "target_forwards": total.target_forwards, "engine_steps": total.engine_steps,
            "cached_tokens": total.cached_tokens, "score_forwards": total.score_forwards,
            "scored_tokens": total.scored_tokens, "replayed": total.replayed,
            "wall_s": round(total.wall_s, 3), "elapsed_s": round(elapsed, 3),
            "generated_tokens_per_question": total.generated_tokens / count,
            "wall_s_per_question": round(total.wall_s / count, 4), "questions": questions}


IID_SAMPLES = ("sample", "vote")  # strategies whose candidates are n independent samples of the prompt


def coverage_curve(rows: list[dict]) -> dict:
    """pass@k for k = 1..N from the largest-budget run whose candidates are N independent samples
    (`sample`, else `vote`); empty without one."""
    samples = [r for r in rows if r["strategy"] in IID_SAMPLES]
    if not samples:
        return {}
    run = max(samples, key=lambda r: (r["strategy"] == "sample", r["budget"]))
    counts = [(len(q["candidates"]), sum(c["correct"] for c in q["candidates"])) for q in run["questions"]]
    ks = list(range(1, run["budget"] + 1))
    return {"from": run["strategy"], "n": run["budget"], "k": ks,
            "pass_at_k": [sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks]}

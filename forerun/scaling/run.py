"""Answering questions with a strategy, and evaluating strategies across budgets on a task.

    outcome = solve(strategy, solver, question, n)     # the answer and its exact account
    results = evaluate(task, problems, runs, budgets, solver_for)   # the dict results.json holds
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from forerun.scaling.passk import pass_at_k
from forerun.scaling.strategies import Solver, Strategy
from forerun.scaling.tasks import Problem, Task
from forerun.scaling.types import Account, Outcome


def solve(strategy: Strategy, solver: Solver, question: str, n: int) -> Outcome:
    """Run one strategy on one question; the outcome's account is what this call cost (the
    generator's account grows by the same amount)."""
    if strategy.needs_scorer and solver.scorer is None:
        raise ValueError(f"strategy {strategy.name!r} needs a scorer (--reward)")
    before, start = solver.generator.account.copy(), time.perf_counter()
    outcome = strategy.run(solver, solver.generator.query(question), n)
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
             solver_for: Callable[[Strategy], Solver], progress: Callable | None = None) -> dict:
    """Every run at every budget on every problem. `progress(iterable, desc)` wraps the loop (tqdm)."""
    records = answer(task, problems, runs, budgets, solver_for, progress)
    return assemble(task.name, len(problems), budgets, records)


def answer(task: Task, problems: list[Problem], runs: list[Run], budgets: list[int],
           solver_for: Callable[[Strategy], Solver], progress: Callable | None = None) -> list[tuple[str, int, list]]:
    """(run name, budget, one record per problem) for every run and budget, in that order."""
    if not problems:
        raise ValueError("no problems to evaluate")
    if not budgets or min(budgets) < 1:
        raise ValueError(f"budgets must be >= 1, got {budgets}")
    check = Checker(task)
    records = []
    for run in runs:
        solver = solver_for(run.strategy)
        for n in budgets:
            items = problems if progress is None else progress(problems, f"{run.name} n={n}")
            records.append((run.name, n, [_question_record(p, solve(run.strategy, solver, p.question, n), check)
                                          for p in items]))
    return records


def assemble(task_name: str, count: int, budgets: list[int], records: list[tuple[str, int, list]]) -> dict:
    """results.json's dict from answer()'s records (of one process, or merged from several)."""
    rows = [_summary(name, n, questions) for name, n, questions in records]
    return {"task": task_name, "problems": count, "budgets": budgets, "runs": rows, "coverage": coverage_curve(rows)}


def _question_record(problem: Problem, outcome: Outcome, check: Checker) -> dict:
    candidates = [{"answer": c.answer, "correct": check(problem, c.text), "score": c.score, "tokens": c.tokens,
                   "text": c.text} for c in outcome.candidates]
    chosen = outcome.chosen
    return {"id": problem.id, "reference": problem.reference if problem.entry_point is None else None,
            "answer": outcome.answer, "correct": bool(chosen) and check(problem, chosen.text),
            "chosen": chosen.text if chosen else None, "candidates": candidates,
            "account": outcome.account.to_dict(), "notes": outcome.notes}


def _summary(name: str, n: int, questions: list[dict]) -> dict:
    total = Account()
    for q in questions:
        total.add(Account(**q["account"]))
    count = len(questions)
    return {"strategy": name, "budget": n, "accuracy": sum(q["correct"] for q in questions) / count,
            "generated_tokens": total.generated_tokens, "prefill_tokens": total.prefill_tokens,
            "target_forwards": total.target_forwards, "engine_steps": total.engine_steps,
            "cached_tokens": total.cached_tokens, "score_forwards": total.score_forwards,
            "scored_tokens": total.scored_tokens,
            "wall_s": round(total.wall_s, 3), "generated_tokens_per_question": total.generated_tokens / count,
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

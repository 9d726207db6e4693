"""Repeated sampling (Large Language Monkeys): n solutions; the answer is the first sample's, and
coverage (pass@k) is read from all n."""
from __future__ import annotations

from forerun.scaling.strategies.base import Solver, check_budget
from forerun.scaling.types import Outcome, Query


class Sample:
    name, needs_scorer = "sample", False

    def run(self, solver: Solver, query: Query, n: int) -> Outcome:
        check_budget(n)
        candidates = [solver.candidate(b) for b in solver.sample(query, n)]
        return Outcome(candidates[0], candidates)

"""Self-consistency (Wang et al. 2022): n solutions, the most frequent extracted answer wins."""
from __future__ import annotations

from forerun.scaling.strategies.base import Solver, check_budget, majority
from forerun.scaling.types import Outcome, Query


class Vote:
    name, needs_scorer = "vote", False

    def run(self, solver: Solver, query: Query, n: int) -> Outcome:
        check_budget(n)
        candidates = [solver.candidate(b) for b in solver.sample(query, n)]
        winner = majority([c.answer for c in candidates])
        chosen = next((c for c in candidates if c.answer == winner), candidates[0])
        return Outcome(chosen, candidates)

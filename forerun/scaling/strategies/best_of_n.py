"""Best-of-n (the highest-scored solution) and weighted best-of-n (the answer whose solutions' weights
exp(score) sum highest, Li et al. 2023 / its_hub)."""
from __future__ import annotations

import math
from collections import defaultdict

from forerun.scaling.strategies.base import Solver, best, check_budget
from forerun.scaling.types import Candidate, Outcome, Query


def _scored(solver: Solver, query: Query, n: int) -> list[Candidate]:
    check_budget(n)
    branches = solver.sample(query, n)
    return [solver.candidate(b, s) for b, s in zip(branches, solver.score(query, branches))]


class BestOfN:
    name, needs_scorer = "best-of-n", True

    def run(self, solver: Solver, query: Query, n: int) -> Outcome:
        candidates = _scored(solver, query, n)
        return Outcome(candidates[best([c.score for c in candidates])], candidates)


class WeightedBestOfN:
    name, needs_scorer = "weighted-best-of-n", True

    def run(self, solver: Solver, query: Query, n: int) -> Outcome:
        candidates = _scored(solver, query, n)
        answered = [c for c in candidates if c.answer is not None]
        if not answered:
            return Outcome(candidates[best([c.score for c in candidates])], candidates)
        top = max(c.score for c in answered)  # weights relative to the best, so exp() cannot overflow
        weight: dict[str, float] = defaultdict(float)
        for c in answered:
            weight[c.answer] += math.exp(c.score - top)
        winner = max(weight, key=lambda a: (weight[a], -next(i for i, c in enumerate(answered) if c.answer == a)))
        chosen = max((c for c in answered if c.answer == winner), key=lambda c: c.score)
        return Outcome(chosen, candidates, notes={"weights": {a: round(w, 6) for a, w in weight.items()}})

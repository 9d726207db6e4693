"""Adaptive compute: sample in waves and stop once the vote is settled, and (with a scorer and a
`prune` threshold) self-evaluate every sample after its first step and finish only those scoring at
least `prune`.

The vote is settled when, with counts a for the leading answer and b for the runner-up and a uniform
prior on their share, P(leader's share > 1/2) >= confidence (Adaptive-Consistency's Beta rule). For
integers that probability is P(Binomial(a + b + 1, 1/2) <= a), summed exactly below."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from forerun.scaling.strategies.base import Solver, check_budget, majority
from forerun.scaling.types import ROOT, Branch, Candidate, Outcome, Query


def leader_probability(a: int, b: int) -> float:
    """P(p > 1/2) for p ~ Beta(a + 1, b + 1) = P(Binomial(a + b + 1, 1/2) <= a)."""
    total = a + b + 1
    return sum(math.comb(total, i) for i in range(a + 1)) / 2 ** total


def settled(answers: list[str | None], confidence: float) -> bool:
    counts = Counter(a for a in answers if a is not None).most_common(2)
    if not counts:
        return False
    a = counts[0][1]
    b = counts[1][1] if len(counts) > 1 else 0
    return leader_probability(a, b) >= confidence


@dataclass(frozen=True)
class Adaptive:
    wave: int = 4
    confidence: float = 0.95
    prune: float | None = None  # log-score threshold after the first step (e.g. log 0.2); None: no pruning
    name, needs_scorer = "adaptive", False

    def __post_init__(self) -> None:
        if self.wave < 1:
            raise ValueError(f"adaptive wave must be >= 1, got {self.wave}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"adaptive confidence must be in (0, 1), got {self.confidence}")

    def run(self, solver: Solver, query: Query, n: int) -> Outcome:
        check_budget(n)
        candidates: list[Candidate] = []
        used = pruned = 0
        while used < n and not settled([c.answer for c in candidates], self.confidence):
            k = min(self.wave, n - used)
            branches = solver.sample(query, k) if self.prune is None else self._pruned_wave(solver, query, k)
            pruned += k - len(branches)
            used += k
            candidates += [solver.candidate(b) for b in branches]
        winner = majority([c.answer for c in candidates])
        chosen = next((c for c in candidates if c.answer == winner), candidates[0] if candidates else None)
        return Outcome(chosen, candidates, notes={"samples": used, "pruned": pruned, "stopped_early": used < n})

    def _pruned_wave(self, solver: Solver, query: Query, k: int) -> list[Branch]:
        first = solver.generator.extend(query, [(ROOT, k)], solver.delimiter)[0]
        done = [b for b in first if b.finished]
        partial = [b for b in first if not b.finished]
        keep = [b for b, s in zip(partial, solver.score(query, partial)) if s >= self.prune]
        rest = solver.generator.extend(query, [(b, 1) for b in keep], None)
        return done + [kids[0] for kids in rest]

"""Step-level beam search (AlphaMath-style): each round the unfinished beams share n one-step
continuations (up to the delimiter; n // beams each, at least one), all in one engine batch; the best
`width` of the new partial solutions and the finished beams, by the scorer's value, survive. On the last
allowed step the beams are finished without a delimiter."""
from __future__ import annotations

from dataclasses import dataclass

from forerun.scaling.strategies.base import Solver, best, check_budget
from forerun.scaling.types import ROOT, Branch, Outcome, Query


@dataclass(frozen=True)
class Beam:
    width: int = 2
    name, needs_scorer = "beam", True

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"beam width must be >= 1, got {self.width}")

    def run(self, solver: Solver, query: Query, n: int) -> Outcome:
        check_budget(n)
        width = min(self.width, n)
        beams: list[Branch] = [ROOT]
        score: dict[Branch, float] = {}
        finished: dict[Branch, None] = {}  # every finished branch seen, in order
        rounds = 0
        while any(not b.finished for b in beams):
            growing = [b for b in beams if not b.finished]
            last = max(b.steps for b in growing) + 1 >= solver.max_steps
            children = max(n // len(growing), 1)
            grown = solver.generator.extend(query, [(b, children) for b in growing], None if last else solver.delimiter)
            pool = [b for b in beams if b.finished] + [c for kids in grown for c in kids]
            fresh = [b for b in pool if b not in score]
            score.update(zip(fresh, solver.score(query, fresh)))
            beams = sorted(pool, key=lambda b: -score[b])[:width]  # sorted() is stable: ties keep order
            finished.update((b, None) for b in pool if b.finished)
            rounds += 1
        candidates = [solver.candidate(b, score[b]) for b in finished]
        chosen = candidates[best([c.score for c in candidates])] if candidates else None
        return Outcome(chosen, candidates, notes={"rounds": rounds, "width": width})

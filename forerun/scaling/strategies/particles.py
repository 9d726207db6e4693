"""Particle filtering (Puri et al. 2025, arXiv 2502.01618; its_hub): n particles are extended one
step at a time; after each step every particle is weighted by softmax(score / temperature) of the
scorer's value of its partial solution and n particles are resampled from those weights (finished
particles stay in the population, unchanged). Copies of one particle extend as one forked request.
The answer is the finished particle with the highest score."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from forerun.scaling.strategies.base import Solver, best, check_budget, softmax
from forerun.scaling.types import ROOT, Branch, Outcome, Query


@dataclass(frozen=True)
class Particles:
    temperature: float = 1.0
    name, needs_scorer = "particles", True

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"particle temperature must be > 0, got {self.temperature}")

    def run(self, solver: Solver, query: Query, n: int) -> Outcome:
        check_budget(n)
        particles: list[Branch] = [ROOT] * n
        score: dict[Branch, float] = {}
        history, rng = [], solver.rng(query)
        while any(not p.finished for p in particles):
            copies = Counter(p for p in particles if not p.finished)  # in first-seen order
            last = max(p.steps for p in copies) + 1 >= solver.max_steps
            grown = solver.generator.extend(query, list(copies.items()), None if last else solver.delimiter)
            particles = [p for p in particles if p.finished] + [c for kids in grown for c in kids]
            fresh = list(dict.fromkeys(p for p in particles if p not in score))
            score.update(zip(fresh, solver.score(query, fresh)))
            weights = softmax([score[p] for p in particles], self.temperature)
            picks = rng.choice(len(particles), size=n, p=weights)
            history.append({"weights": [round(float(w), 6) for w in weights], "picks": picks.tolist()})
            particles = [particles[i] for i in sorted(picks)]
        finished = list(dict.fromkeys(particles))
        candidates = [solver.candidate(p, score[p]) for p in finished]
        chosen = candidates[best([c.score for c in candidates])]
        return Outcome(chosen, candidates, notes={"rounds": len(history), "resampling": history})

"""What every strategy works with, and the helpers they share.

A strategy is one method, run(solver, query, n) -> Outcome: it asks solver.generator for continuations
(whole solutions, or one step at a time up to solver.delimiter), scores them with solver.scorer, and
picks an answer. n is its budget: samples, particles, or beam continuations per round.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from forerun.scaling.generator import Generator
from forerun.scaling.scorers import Scorer
from forerun.scaling.types import ROOT, Branch, Candidate, Outcome, Query


@dataclass
class Solver:
    generator: Generator
    answer_of: Callable[[str], str | None]  # the task's answer extraction (None: no answer found)
    scorer: Scorer | None = None
    delimiter: str = "\n\n"  # between steps, for step-level strategies
    max_steps: int = 8  # a step-level search finishes its branches on this step
    seed: int = 0  # for the strategies' own randomness (resampling)

    def rng(self, query: Query) -> np.random.Generator:
        """The random stream for one question: from (seed, the question), whatever ran before."""
        return np.random.default_rng([self.seed, query.key])

    def sample(self, query: Query, n: int) -> list[Branch]:
        """n whole solutions forked from one prefill of the prompt."""
        return self.generator.extend(query, [(ROOT, n)], None)[0]

    def score(self, query: Query, branches: list[Branch]) -> list[float]:
        if self.scorer is None:
            raise ValueError("this strategy needs a scorer (--reward)")
        return self.scorer.score(query, branches) if branches else []

    def candidate(self, branch: Branch, score: float | None = None) -> Candidate:
        return Candidate(branch.text, self.answer_of(branch.text), score, len(branch.token_ids))


class Strategy(Protocol):
    name: str
    needs_scorer: bool

    def run(self, solver: Solver, query: Query, n: int) -> Outcome:
        ...


def majority(answers: list[str | None]) -> str | None:
    """The most frequent answer (None ignored); ties go to the one seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    first = {a: i for i, a in reversed(list(enumerate(answers)))}
    return max(counts, key=lambda a: (counts[a], -first[a]))


def best(scores: list[float]) -> int:
    """Index of the highest score; the first on ties."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def softmax(scores: list[float], temperature: float = 1.0) -> np.ndarray:
    if temperature <= 0:
        raise ValueError(f"softmax temperature must be > 0, got {temperature}")
    x = np.asarray(scores, dtype=np.float64) / temperature
    x = np.exp(x - x.max())
    return x / x.sum()


def check_budget(n: int) -> None:
    if n < 1:
        raise ValueError(f"the budget n must be >= 1, got {n}")


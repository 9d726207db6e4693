"""A*-decoding over solution steps: a frontier of partial solutions ordered by f = g + h, where
g is the sum of the scorer's (log) step values along the path and h estimates the steps still to
come at the path's mean step value, up to `horizon` steps (a finished solution has h = 0). Each
round the `batch` best frontier nodes are expanded by `branching` one-step continuations (in one
engine batch); the search stops at the first finished solution popped whose score reaches `accept`,
or when `n` nodes have been expanded (then: the best finished one seen, else the best partial
finished greedily)."""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

from forerun.scaling.strategies.base import Solver, best, check_budget
from forerun.scaling.types import ROOT, Branch, Candidate, Outcome, Query


@dataclass(frozen=True)
class Node:
    branch: Branch
    g: float  # sum of step scores so far
    score: float  # the scorer's value of this partial (or finished) solution

    def f(self, horizon: int) -> float:
        if self.branch.finished or self.branch.steps == 0:
            return self.g
        return self.g + self.g / self.branch.steps * max(horizon - self.branch.steps, 0)


@dataclass(frozen=True)
class AStar:
    branching: int = 2
    batch: int = 1
    accept: float = -math.inf
    horizon: int | None = None  # default: the solver's max_steps
    name, needs_scorer = "astar", True

    def __post_init__(self) -> None:
        if self.branching < 1 or self.batch < 1:
            raise ValueError("astar branching and batch must be >= 1")

    def run(self, solver: Solver, query: Query, n: int) -> Outcome:
        check_budget(n)
        horizon = self.horizon or solver.max_steps
        order = itertools.count()
        frontier = [(-0.0, next(order), Node(ROOT, 0.0, 0.0))]
        finished: list[Candidate] = []
        expanded, popped = 0, []
        while frontier and expanded < n:
            take = []
            while frontier and len(take) < min(self.batch, n - expanded):
                node = heapq.heappop(frontier)[2]
                popped.append(node.branch.text)
                if not node.branch.finished:
                    take.append(node)
                elif node.score >= self.accept:
                    return self._done(solver.candidate(node.branch, node.score), finished, expanded, popped)
            if not take:
                continue
            kids = self._expand(solver, query, take)
            expanded += len(take)
            for node in kids:
                heapq.heappush(frontier, (-node.f(horizon), next(order), node))
                if node.branch.finished:
                    finished.append(solver.candidate(node.branch, node.score))
        if finished:
            return self._done(finished[best([c.score for c in finished])], finished, expanded, popped)
        if not frontier:
            return Outcome(None, finished, notes={"expanded": expanded, "popped": popped})
        # nothing finished within the budget: finish the best partial (the heap's top) in one go
        end = solver.generator.extend(query, [(frontier[0][2].branch, 1)], None)[0][0]
        chosen = solver.candidate(end, solver.score(query, [end])[0])
        return self._done(chosen, finished + [chosen], expanded, popped)

    def _expand(self, solver: Solver, query: Query, take: list[Node]) -> list[Node]:
        stops = [None if node.branch.steps + 1 >= solver.max_steps else solver.delimiter for node in take]
        kids: list[tuple[Node, Branch]] = []
        for stop in dict.fromkeys(stops):  # one batch per kind of stop: usually a single one
            group = [node for node, s in zip(take, stops) if s == stop]
            grown = solver.generator.extend(query, [(node.branch, self.branching) for node in group], stop)
            kids += [(node, b) for node, bs in zip(group, grown) for b in bs]
        scores = solver.score(query, [b for _, b in kids])
        return [Node(b, parent.g + s, s) for (parent, b), s in zip(kids, scores)]

    @staticmethod
    def _done(chosen: Candidate, finished: list[Candidate], expanded: int, popped: list[str]) -> Outcome:
        candidates = finished if chosen in finished else finished + [chosen]
        return Outcome(chosen, candidates, notes={"expanded": expanded, "popped": popped})

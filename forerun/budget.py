"""Cutting each draft tree to the size that pays (SpecConfig.budget = "cost").

A drafter proposes its whole tree; verifying a node costs time whether or not it is accepted. The
budget keeps the nodes that are worth their rows in the verification forward, from two running
measurements:

- RowCost: seconds of one step as a function of the rows it verifies, from what steps of each
  size took. One row is a plain step. On a GPU the curve is nearly flat; on a CPU whose forward
  is compute-bound it is steep.
- NodeOdds: for every position in a tree, named by its path of sibling ranks ((0,) is the root's
  first child, (0, 1) that child's second child), the fraction of the steps it was on the accepted
  path. A step's expected output is 1 + the sum of these over the nodes verified.

Given both, each step keeps the k nodes with the best odds (ancestors and earlier siblings first)
for the k that maximises expected tokens per second, k = 0 being a plain step (extra nodes, such as
lookahead's window, go too). Positions it stops verifying are re-measured now and then with the full
tree (a check): after CHECK_EVERY steps, then twice as long each time, up to every CHECK_MAX steps.
The LLM keeps one budget per SpecConfig, so what it measured carries across requests.

Exactness. Greedy verification accepts the target's own tokens from any tree, so any cut is exact.
At temperature > 0 a cut may only depend on what was known before the step's random draws: that
holds for deterministic drafts (q is None: the tree is a function of the context), so those are cut;
a tree whose tokens were sampled (q given) is verified whole.
"""
from __future__ import annotations

import bisect
import itertools
import statistics
from collections import deque
from collections.abc import Callable

import torch

from forerun.drafters.tree_shape import sibling_ranks
from forerun.types import Draft, Extra, Verdict


class RowCost:
    """Seconds per step as a function of the rows verified, from the recent steps of each row count.

    A row count's value is the low median of its last KEEP steps, so one slow step (a new shape's
    first run allocates and picks kernels; the machine was busy) is outvoted by the next. Between
    measured row counts the cost is interpolated (and never falls as rows grow); past the widest,
    it grows along the slope of a line fit to all of them. Interpolation matters on a GPU, where
    the curve is a step (one row, then about 1.25x for anything from 2 to 128 rows on an H200) that
    a single line would read as a steady cost per row."""

    KEEP = 5

    def __init__(self) -> None:
        self.steps: dict[int, deque[float]] = {}  # rows -> seconds of its last KEEP steps

    @property
    def seconds(self) -> dict[int, float]:
        return {rows: statistics.median_low(s) for rows, s in self.steps.items()}

    def record(self, rows: int, seconds: float) -> None:
        self.steps.setdefault(rows, deque(maxlen=self.KEEP)).append(seconds)

    def line(self) -> tuple[float, float] | None:
        """(a, b) with seconds ~ a + b * rows by weighted least squares; None until two row counts
        are known. The slope is kept >= 0 and the cost of one row > 0."""
        return self._fit(self.seconds) if len(self.steps) >= 2 else None

    def _fit(self, seconds: dict[int, float]) -> tuple[float, float]:
        points = [(rows, secs, len(self.steps[rows])) for rows, secs in seconds.items()]
        total = sum(w for _, _, w in points)
        mx = sum(x * w for x, _, w in points) / total
        my = sum(y * w for _, y, w in points) / total
        sxx = sum(w * (x - mx) ** 2 for x, _, w in points)
        b = max(sum(w * (x - mx) * (y - my) for x, y, w in points) / sxx, 0.0)
        a = my - b * mx
        floor = min(y for _, y, _ in points) * 1e-3
        if a + b <= floor:  # a noisy fit through the origin: keep one row's cost positive
            a = floor - b
        return a, b

    def curve(self) -> Callable[[int], float] | None:
        """seconds(rows) for any row count; None until two row counts are known."""
        if len(self.steps) < 2:
            return None
        rows, seconds = sorted(self.steps), self.seconds
        ys = list(itertools.accumulate((seconds[r] for r in rows), max))
        slope = self._fit(seconds)[1]

        def at(n: int) -> float:
            i = bisect.bisect_left(rows, n)
            if i < len(rows) and rows[i] == n:
                return ys[i]
            if i == 0:
                return ys[0]
            if i == len(rows):
                return ys[-1] + slope * (n - rows[-1])
            x0, x1 = rows[i - 1], rows[i]
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (n - x0) / (x1 - x0)

        return at


class NodeOdds:
    """Running chance that a tree position (a path of sibling ranks) is on the accepted path."""

    MIN_WEIGHT = 0.05  # a plain average over the first 20 visits, then a running mean
    UNSEEN = 0.5  # an unseen position: this fraction of its parent's odds

    def __init__(self) -> None:
        self.odds: dict[tuple[int, ...], float] = {}
        self.visits: dict[tuple[int, ...], int] = {}

    def estimate(self, paths: list[tuple[int, ...]], parents: list[int]) -> list[float]:
        """Odds per node (root 1.0), made monotone: no node above its parent or an earlier sibling."""
        out: list[float] = []
        last_child: dict[int, int] = {}
        for i, (path, parent) in enumerate(zip(paths, parents)):
            if parent < 0:
                out.append(1.0)
                continue
            p = min(self.odds.get(path, self.UNSEEN * out[parent]), out[parent])
            if parent in last_child:
                p = min(p, out[last_child[parent]])
            last_child[parent] = i
            out.append(p)
        return out

    def record(self, paths: list[tuple[int, ...]], accepted: set[int]) -> None:
        for i, path in enumerate(paths[1:], 1):
            n = self.visits.get(path, 0) + 1
            w = max(1.0 / n, self.MIN_WEIGHT)
            self.visits[path] = n
            self.odds[path] = (1 - w) * self.odds.get(path, 0.0) + w * (i in accepted)


def rank_paths(parents: list[int]) -> list[tuple[int, ...]]:
    """Each node's path of sibling ranks from the root (the root's is ())."""
    ranks, out = sibling_ranks(parents), []
    for i, p in enumerate(parents):
        out.append(() if p < 0 else out[p] + (ranks[i],))
    return out


def best_size(odds: list[float], cost: Callable[[int], float], extra_rows: int) -> int:
    """How many of the nodes (odds best first) to verify: the k that maximises expected tokens,
    1 + sum(odds[:k]), per second, cost(rows); extra rows ride along only when k > 0."""
    best_k, best_rate, expected = 0, 1.0 / cost(1), 1.0
    for k, p in enumerate(odds, 1):
        expected += p
        rate = expected / cost(1 + k + extra_rows)
        if rate >= best_rate:  # a tie goes to the bigger tree: its logits also feed the drafter
            best_k, best_rate = k, rate
    return best_k


def keep_nodes(draft: Draft, keep: list[int]) -> Draft:
    """The draft restricted to `keep` (sorted node indices, root included, closed under parents)."""
    index = {old: new for new, old in enumerate(keep)}
    parents = [-1 if draft.parents[i] < 0 else index[draft.parents[i]] for i in keep]
    if len(keep) == 1:
        return Draft(tokens=draft.tokens[:1], parents=parents)  # a plain step: no extra nodes either
    rows = torch.tensor(keep)
    extra = draft.extra
    if extra is not None:
        columns = torch.cat([rows, torch.arange(draft.size, draft.rows)])
        extra = Extra(tokens=extra.tokens, depths=extra.depths, mask=extra.mask[:, columns])
    q = None if draft.q is None else draft.q[rows]
    return Draft(tokens=draft.tokens[rows], parents=parents, q=q, extra=extra)


class TreeBudget:
    CHECK_EVERY = 16
    CHECK_MAX = 256

    def __init__(self) -> None:
        self.cost = RowCost()
        self.odds = NodeOdds()
        self.steps = 0
        self.interval = self.CHECK_EVERY
        self.next_check = self.CHECK_EVERY

    def cut(self, draft: Draft, greedy: bool) -> Draft:
        """The part of `draft` worth verifying this step."""
        if (draft.size == 1 and draft.extra is None) or (draft.q is not None and not greedy):
            return draft
        cost = self.cost.curve()
        if cost is None:  # measure one plain step, then trees
            return keep_nodes(draft, [0]) if 1 not in self.cost.steps else draft
        if self.steps >= self.next_check:
            self.next_check = self.steps + self.interval
            self.interval = min(2 * self.interval, self.CHECK_MAX)
            return draft
        odds = self.odds.estimate(rank_paths(draft.parents), draft.parents)
        order = sorted(range(1, draft.size), key=lambda i: (-odds[i], i))
        k = best_size([odds[i] for i in order], cost, draft.rows - draft.size)
        if 0 < k == draft.size - 1:
            return draft
        return keep_nodes(draft, sorted([0] + order[:k]))

    def record(self, draft: Draft, verdict: Verdict, seconds: float) -> None:
        """After a step that verified `draft` (as cut) in `seconds`, drafting included."""
        self.cost.record(draft.rows, seconds)
        if draft.size > 1:
            self.odds.record(rank_paths(draft.parents), set(verdict.path))
        self.steps += 1

"""Cutting each draft tree to the size that pays (SpecConfig.budget = "cost").

A drafter proposes its whole tree; verifying a node costs time whether or not it is accepted. The
budget keeps the nodes that are worth their rows in the verification forward, from two running
measurements:

- RowCost: seconds of one step as a function of the rows it verifies, fit as a line
  (a + b * rows) to what steps of each size took. One row is a plain step. On a GPU the line is
  nearly flat; on a CPU whose forward is compute-bound it is steep.
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

import torch

from forerun.drafters.tree_shape import sibling_ranks
from forerun.types import Draft, Extra, Verdict


class RowCost:
    """Seconds per step as a line in the rows verified, fit to running means per row count."""

    WEIGHT = 0.25  # of the newest step in a row count's running mean

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}  # rows -> running mean of the step's seconds

    def record(self, rows: int, seconds: float) -> None:
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else (1 - self.WEIGHT) * old + self.WEIGHT * seconds

    def line(self) -> tuple[float, float] | None:
        """(a, b) with seconds ~ a + b * rows by least squares; None until two row counts are known.
        The slope is kept >= 0 and the cost of one row > 0."""
        if len(self.seconds) < 2:
            return None
        rows, secs = zip(*self.seconds.items())
        n, mx, my = len(rows), sum(rows) / len(rows), sum(secs) / len(secs)
        sxx = sum((x - mx) ** 2 for x in rows)
        b = max(sum((x - mx) * (y - my) for x, y in zip(rows, secs)) / sxx, 0.0)
        a = my - b * mx
        floor = min(secs) * 1e-3 / n
        if a + b <= floor:  # a noisy fit through the origin: keep one row's cost positive
            a = floor - b
        return a, b


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


def best_size(odds: list[float], line: tuple[float, float], extra_rows: int) -> int:
    """How many of the nodes (odds best first) to verify: the k that maximises expected tokens,
    1 + sum(odds[:k]), per second, a + b * rows; extra rows ride along only when k > 0."""
    a, b = line
    best_k, best_rate, expected = 0, 1.0 / (a + b), 1.0
    for k, p in enumerate(odds, 1):
        expected += p
        rate = expected / (a + b * (1 + k + extra_rows))
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
        n = draft.size
        columns = torch.cat([rows, torch.arange(n, n + extra.tokens.shape[0])])
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
        line = self.cost.line()
        if line is None:  # measure one plain step, then trees
            return keep_nodes(draft, [0]) if 1 not in self.cost.seconds else draft
        if self.steps >= self.next_check:
            self.next_check = self.steps + self.interval
            self.interval = min(2 * self.interval, self.CHECK_MAX)
            return draft
        odds = self.odds.estimate(rank_paths(draft.parents), draft.parents)
        order = sorted(range(1, draft.size), key=lambda i: (-odds[i], i))
        extra_rows = 0 if draft.extra is None else draft.extra.tokens.shape[0]
        k = best_size([odds[i] for i in order], line, extra_rows)
        if 0 < k == draft.size - 1:
            return draft
        return keep_nodes(draft, sorted([0] + order[:k]))

    def record(self, draft: Draft, verdict: Verdict, seconds: float) -> None:
        """After a step that verified `draft` (as cut) in `seconds`, drafting included."""
        rows = draft.size + (0 if draft.extra is None else draft.extra.tokens.shape[0])
        self.cost.record(rows, seconds)
        if draft.size > 1:
            self.odds.record(rank_paths(draft.parents), set(verdict.path))
        self.steps += 1

"""The goodput policy (SpecConfig.budget = "goodput"): how much of every
sequence's draft a batched step verifies, after SmartSpec (Liu et al. 2024, arXiv 2406.14066).

A verification forward costs time for every row it holds, accepted or not, and on a CPU whose
forward is compute-bound the rows of all sequences in a batch add up. Each step the policy keeps the
draft nodes that maximise the batch's expected tokens per second (its goodput),

    (tokens the step emits for sure + sum of the kept nodes' acceptance odds) / seconds(rows),

from two running measurements:

- RowCost: seconds of one step as a function of the rows of its forward, from what steps of each
  size took (the engine keeps one: it is the model's and the machine's).
- NodeOdds: for every position in a tree, named by its path of sibling ranks ((0,) is the root's
  first child, (0, 1) that child's second child), the fraction of the steps it was on the accepted
  path (one per SpecConfig, kept across requests). A sequence's odds are scaled by how its own drafts
  fared against them so far (Sequence.accepted_ratio): prompt lookup on a summary accepts more
  than on a chat. Odds are also kept per context: the drafter's key for its draft (prompt lookup:
  the matched n-gram's length) and how the sequence's previous draft went, since acceptance comes
  in runs. A drafter with keys is asked to draft only when its best context could pay.

Nodes enter best odds first, across all sequences (ancestors and earlier siblings before
descendants and later ones); extra nodes (lookahead's window) ride along with a sequence's first
node. Keeping none is a plain step. Under a load where rows cost more than they are likely to return,
every sequence goes plain by itself. Before drafting, the same rule sets the depth of the drafters
that pay a forward per drafted token (Drafter.drafts_with_model), so drafting no one will verify is
not paid for.

Positions the policy stops verifying are re-measured now and then with a whole tree (a check) for
one sequence of that SpecConfig: after CHECK_EVERY steps, then twice as long each time, up to every
CHECK_MAX steps.

Exactness. Greedy verification accepts the target's own tokens from any tree, so any cut is exact.
At temperature > 0 a cut may only depend on what was known before the step's random draws: that
holds for deterministic drafts (q is None: the tree is a function of the context), so those are cut;
a tree whose tokens were sampled (q given) is verified whole, its depth set before it is drawn.
"""
from __future__ import annotations

import bisect
import itertools
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from forerun.backoff import Backoff
from forerun.tree import TreeShape
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
    """Running chance that a tree position (a path of sibling ranks) is on the accepted path, kept
    over all drafts and per context: the drafter's key for its draft (Draft.key, e.g. how long a
    match prompt lookup found) and how the sequence's previous step went (Sequence.last_draft), since
    acceptance comes in runs. A context seen fewer than TRUST times at a position uses the position's
    odds over all contexts."""

    MIN_WEIGHT = 0.05  # a plain average over the first 20 visits, then a running mean
    UNSEEN = 0.5  # an unseen position: this fraction of its parent's odds
    TRUST = 8

    def __init__(self) -> None:
        self.odds: dict[tuple[object, tuple[int, ...]], float] = {}  # (context or None, path) -> odds
        self.visits: dict[tuple[object, tuple[int, ...]], int] = {}

    def _odds(self, context: object, path: tuple[int, ...], unseen: float) -> float:
        """A position's odds in a context; until the context is trusted there, no less than `unseen`
        (so a new context is tried a few times rather than judged by the average of all others)."""
        overall = self.odds.get((None, path))
        if context is None:
            return unseen if overall is None else overall
        if self.visits.get((context, path), 0) >= self.TRUST:
            return self.odds[context, path]
        return unseen if overall is None else max(overall, unseen)

    def estimate(self, shape: TreeShape, context: object = None) -> list[float]:
        """Odds per node (root 1.0), made monotone: no node above its parent or an earlier sibling."""
        out: list[float] = []
        last_child: dict[int, int] = {}
        for i, (path, parent) in enumerate(zip(shape.rank_paths, shape.parents)):
            if parent < 0:
                out.append(1.0)
                continue
            p = min(self._odds(context, path, self.UNSEEN * out[parent]), out[parent])
            if parent in last_child:
                p = min(p, out[last_child[parent]])
            last_child[parent] = i
            out.append(p)
        return out

    def best_first(self) -> float:
        """The odds of a root's first child in the most favourable context seen."""
        contexts = {c for c, path in self.visits if c is not None and path == (0,)}
        return max([self._odds(c, (0,), self.UNSEEN) for c in contexts | {None}])

    def record(self, shape: TreeShape, accepted: set[int], context: object = None) -> None:
        for i, path in enumerate(shape.rank_paths[1:], 1):
            for key in ((None, path), (context, path)) if context is not None else ((None, path),):
                n = self.visits.get(key, 0) + 1
                w = max(1.0 / n, self.MIN_WEIGHT)
                self.visits[key] = n
                self.odds[key] = (1 - w) * self.odds.get(key, 0.0) + w * (i in accepted)


def keep_nodes(draft: Draft, keep: list[int]) -> Draft:
    """The draft restricted to `keep` (sorted node indices, root included, closed under parents): its
    subtree, with the kept nodes' q rows and the extra nodes' mask columns for them."""
    tree = draft.tree.subtree(keep)
    if len(keep) == 1:
        return Draft(tree)  # a plain step: no extra nodes either
    rows = torch.tensor(keep)
    extra = draft.extra
    if extra is not None:
        columns = torch.cat([rows, torch.arange(draft.size, draft.rows)])
        extra = Extra(tokens=extra.tokens, depths=extra.depths, mask=extra.mask[:, columns])
    q = None if draft.q is None else draft.q[rows]
    return Draft(tree, q=q, extra=extra, key=draft.key)


def best_cut(odds: list[tuple[float, int]], sure_tokens: float, sure_rows: int, extra_rows: dict[int, int],
             cost: Callable[[int], float]) -> int:
    """How many of the candidate nodes (odds, owner), best odds first, to verify: the k that maximises
    (sure_tokens + their odds) / cost(sure_rows + k + the extra rows of every owner with a kept node).
    A tie goes to more nodes: their logits also teach the drafters."""
    best_k, best_rate = 0, sure_tokens / cost(sure_rows)
    tokens, rows, started = sure_tokens, sure_rows, set()
    for k, (p, owner) in enumerate(odds, 1):
        tokens += p
        rows += 1
        if owner not in started:
            started.add(owner)
            rows += extra_rows.get(owner, 0)
        rate = tokens / cost(rows)
        if rate >= best_rate:
            best_k, best_rate = k, rate
    return best_k


@dataclass(eq=False)
class SpecOdds:
    """What the policy keeps per SpecConfig across requests."""

    CHECK_EVERY = 16
    CHECK_MAX = 256

    odds: NodeOdds = field(default_factory=NodeOdds)
    checks: Backoff = field(default_factory=lambda: Backoff(SpecOdds.CHECK_EVERY, SpecOdds.CHECK_MAX))
    steps: int = 0  # steps with a sequence of this SpecConfig

    def check_due(self) -> bool:
        """Whether this step verifies one whole tree (counts the step)."""
        self.steps += 1
        if not self.checks.due(self.steps):
            return False
        self.checks.checked(self.steps)
        return True


@dataclass(frozen=True, slots=True)
class Drafting:
    """One sequence about to draft, as the policy plans how deep."""

    spec: object  # its SpecConfig, whose odds apply
    ratio: float  # the sequence's accepted_ratio
    depth: int  # the most it may draft
    checked: bool  # this step's check of its SpecConfig: it drafts its full depth
    last_draft: str  # how the sequence's previous step went (Sequence.last_draft)
    keyed: bool  # its drafter's drafts carry a Draft.key, known only once it has drafted


@dataclass(eq=False)
class Entry:
    """One sequence's draft as the policy sees it, once drafted."""

    draft: Draft
    memory: SpecOdds
    ratio: float  # the sequence's accepted_ratio
    cuttable: bool  # greedy, or a deterministic draft
    checked: bool = False  # this step's check of its SpecConfig: verified whole
    context: object = None  # (draft.key, the sequence's last_draft): what its odds are kept under


class Goodput:
    def __init__(self) -> None:
        self.cost = RowCost()
        self._memory: dict[object, SpecOdds] = {}

    def memory(self, spec) -> SpecOdds:
        if spec not in self._memory:
            self._memory[spec] = SpecOdds()
        return self._memory[spec]

    def forget(self, spec) -> None:
        self._memory.pop(spec, None)

    def due_checks(self, specs) -> set:
        """The SpecConfigs (each with a sequence in this step) whose check is due: one of their
        sequences drafts to its full depth and is verified whole. Counts the step for each."""
        return {spec for spec in specs if self.memory(spec).check_due()}

    def depths(self, chains: list[Drafting], sure_rows: int, sure_tokens: float) -> list[int]:
        """Before drafting: how deep each sequence should draft, from the odds of a chain's positions;
        a checked one drafts its full depth. A keyed drafter's context is only known once it has
        drafted: it keeps its depth unless not even the first node of its best context could pay.
        sure_rows and sure_tokens count the step's rows and certain tokens besides these sequences'
        drafts (their roots included)."""
        cost = self.cost.curve()
        if cost is None:
            return [c.depth for c in chains]
        candidates = []
        for owner, c in enumerate(chains):
            if c.checked:
                sure_rows += c.depth
                continue
            odds = self.memory(c.spec).odds
            if c.keyed:
                candidates.append((min(1.0, c.ratio * odds.best_first()), owner))
                continue
            positions = odds.estimate(TreeShape(list(range(-1, c.depth))), (None, c.last_draft))
            candidates += [(min(1.0, c.ratio * p), owner) for p in positions[1:]]
        candidates.sort(key=lambda candidate: -candidate[0])  # stable: a chain's positions stay in order
        out = [c.depth if c.checked else 0 for c in chains]
        for _, owner in candidates[:best_cut(candidates, sure_tokens, sure_rows, {}, cost)]:
            out[owner] += 1
        return [c.depth if c.keyed and d else d for c, d in zip(chains, out)]

    def cut(self, entries: list[Entry], sure_rows: int, sure_tokens: float) -> list[Draft]:
        """After drafting: each entry's draft as the step should verify it. sure_rows and sure_tokens
        count the step's rows and certain tokens besides these drafts' nodes (their roots included)."""
        cost = self.cost.curve()
        if cost is None:  # first measure the rows without drafts, then with them
            if sure_rows not in self.cost.steps:
                return [keep_nodes(e.draft, [0]) if e.cuttable else e.draft for e in entries]
            return [e.draft for e in entries]
        candidates, extra_rows, orders = [], {}, []
        for owner, e in enumerate(entries):
            if not e.cuttable or e.checked:
                sure_rows += e.draft.rows - 1
                orders.append(None)
                continue
            odds = e.memory.odds.estimate(e.draft.tree, e.context)
            odds = [min(1.0, e.ratio * p) for p in odds]
            order = sorted(range(1, e.draft.size), key=lambda i: (-odds[i], i))
            orders.append(order)
            candidates += [(odds[i], owner) for i in order]
            extra_rows[owner] = e.draft.rows - e.draft.size
        candidates.sort(key=lambda c: -c[0])  # stable: each owner's nodes stay in their order
        kept = [0] * len(entries)
        for _, owner in candidates[:best_cut(candidates, sure_tokens, sure_rows, extra_rows, cost)]:
            kept[owner] += 1
        out = []
        for e, order, k in zip(entries, orders, kept):
            whole = order is None or 0 < k == e.draft.size - 1  # (no node kept: no extra nodes either)
            out.append(e.draft if whole else keep_nodes(e.draft, sorted([0] + order[:k])))
        return out

    def record(self, rows: int, seconds: float) -> None:
        self.cost.record(rows, seconds)

    def learn(self, spec, draft: Draft, verdict: Verdict, context: object) -> float:
        """After a sequence's draft was verified: update its SpecConfig's odds; returns the accepted
        tokens the odds expected (before this update), for the sequence's accepted_ratio."""
        if draft.size == 1:
            return 0.0
        memory = self.memory(spec)
        expected = sum(memory.odds.estimate(draft.tree, context)[1:])
        memory.odds.record(draft.tree, set(verdict.path), context)
        return expected

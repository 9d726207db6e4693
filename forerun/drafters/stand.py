"""STAND-style stochastic n-gram drafting (Song et al. 2025), model-free and exact when sampling.

Memory: for every context of the last 1..n tokens seen during decoding, the target's next-token
distribution, kept compactly as its top-k tokens and probabilities (not counts). Verification hands
the drafter the target's logits at every draft node, rejected branches included, so each step
refreshes one entry per node and order; a context seen again mixes the new distribution into the
stored one. Entries are stored at temperature 1 and re-tempered when drafting.

Drafting fills a tree shape with the longest stored context's distribution at every node: its
top-k tokens when greedy (deterministic, q is None), or Gumbel-top-k draws, i.e. sampling without
replacement, at temperature > 0. Then sibling j's q row is the stored distribution renormalised
over the tokens not drawn before it, which keeps recursive rejection sampling exact.

Shape: the drafter counts, per (depth, sibling rank), how often a child of an accepted node was
accepted, and regrows the shape from those rates (tree_shape.grow_shape) within a node budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from forerun.drafters.base import Drafter, Sequence, room
from forerun.drafters.registry import register
from forerun.drafters.tree_shape import RANK_PRIOR, cut_shape, grow_shape
from forerun.sampling import gumbel_top_k
from forerun.tree import Tree
from forerun.types import Draft, Scores, Verdict

PRIOR_TRIALS = 4.0  # pseudo-counts behind RANK_PRIOR before any acceptance has been seen


@dataclass(frozen=True)  # not slotted: the class attributes are the defaults
class StandOptions:
    n: int = 4  # longest context (tokens) a distribution is keyed by
    k: int = 8  # tokens per stored distribution, and most children per node
    nodes: int = 40  # tree size, root included
    depth: int = 6  # deepest level of the tree shape
    mix: float = 0.5  # weight of the newest distribution when a context is seen again
    capacity: int = 200_000  # contexts kept per order; the least recently updated go first
    reshape_every: int = 16  # steps between regrowths of the tree shape

    @classmethod
    def from_spec(cls, spec) -> StandOptions:
        known = {name: getattr(cls, name) for name in cls.__dataclass_fields__}
        opts = cls(**spec.option_values(known))
        if opts.n < 1 or not 1 <= opts.k <= len(RANK_PRIOR) or opts.nodes < 1 or opts.depth < 1 \
                or not 0 < opts.mix <= 1 or opts.capacity < 1 or opts.reshape_every < 1:
            raise ValueError(f"invalid stand options: {opts}")
        return opts


class NgramMemory:
    """Compact next-token distributions keyed by the last 1..n tokens of a context."""

    def __init__(self, n: int, k: int, mix: float, capacity: int):
        self.n, self.k, self.mix, self.capacity = n, k, mix, capacity
        # tables[m - 1]: m-token context -> (tokens [<=k] int64, probabilities [<=k] float64), best first
        self.tables: list[dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(n)]

    def lookup(self, context: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """The distribution stored for the longest suffix of `context` that has one."""
        for m in range(min(self.n, len(context)), 0, -1):
            hit = self.tables[m - 1].get(tuple(context[-m:]))
            if hit is not None:
                return hit
        return None

    def update(self, context: list[int], tokens: np.ndarray, probs: np.ndarray) -> None:
        for m in range(1, min(self.n, len(context)) + 1):
            table, key = self.tables[m - 1], tuple(context[-m:])
            old = table.pop(key, None)  # re-inserted below: dict order is then recency order
            table[key] = (tokens, probs) if old is None else self._merge(old, tokens, probs)
            if len(table) > self.capacity:
                del table[next(iter(table))]

    def _merge(self, old, tokens, probs):
        mixed = dict(zip(old[0].tolist(), (old[1] * (1 - self.mix)).tolist()))
        for t, p in zip(tokens.tolist(), (probs * self.mix).tolist()):
            mixed[t] = mixed.get(t, 0.0) + p
        best = sorted(mixed.items(), key=lambda item: -item[1])[: self.k]
        return np.array([t for t, _ in best]), np.array([p for _, p in best])


@register("stand")
class Stand(Drafter):
    def __init__(self, target, spec):
        super().__init__(target, spec)
        self.opts = StandOptions.from_spec(spec)
        self.vocab = target.model.args.vocab_size
        self.memory = NgramMemory(self.opts.n, self.opts.k, self.opts.mix, self.opts.capacity)
        # hits / trials per (depth, rank): how often a child of an accepted node was accepted
        shape = (self.opts.depth + 1, self.opts.k)
        self.trials = np.full(shape, PRIOR_TRIALS)
        self.hits = PRIOR_TRIALS * np.broadcast_to(np.array(RANK_PRIOR[: self.opts.k]), shape).copy()
        self.steps = 0
        self.shape = self._grow()

    def _grow(self):
        rates = np.clip(self.hits / self.trials, 1e-3, 1.0)
        return grow_shape(lambda d, r: float(rates[min(d, self.opts.depth), r]),
                          self.opts.nodes, self.opts.depth, self.opts.k)

    # --- drafting ---------------------------------------------------------------------------------

    def propose(self, seq: Sequence, depth: int) -> Draft:
        shape = cut_shape(self.shape, room(seq), depth)
        n = self.opts.n
        tokens, parents, q_rows = [seq.root], [-1], [None]
        contexts = [seq.tokens[-n:]]
        placed = {0: 0}  # shape node -> draft node
        kids: dict[int, tuple[list[int], list[torch.Tensor | None]]] = {}  # draft node -> ordered children
        for i in range(1, shape.size):
            parent = placed.get(shape.parents[i])
            if parent is None:
                continue
            if parent not in kids:
                kids[parent] = self._children(contexts[parent], seq)
            options, qs = kids[parent]
            rank = shape.ranks[i]
            if rank >= len(options):  # the stored distribution has fewer tokens: a leaf here
                continue
            placed[i] = len(tokens)
            tokens.append(options[rank]), parents.append(parent), q_rows.append(qs[rank])
            contexts.append((contexts[parent] + [options[rank]])[-n:])
        q = None
        if not seq.params.greedy:
            q = torch.stack([torch.zeros(self.vocab) if r is None else r for r in q_rows])
        return Draft(Tree(tokens=torch.tensor(tokens), parents=parents), q=q)

    def _children(self, context: list[int], seq: Sequence) -> tuple[list[int], list[torch.Tensor | None]]:
        """A node's candidate children in draw order, with the distribution each was drawn from."""
        hit = self.memory.lookup(context)
        if hit is None:
            return [], []
        stored, probs = hit
        if seq.params.greedy:
            return stored.tolist(), [None] * len(stored)
        tempered = torch.from_numpy(probs).float().pow(1.0 / seq.params.temperature)
        tempered /= tempered.sum()
        order = gumbel_top_k(tempered, len(stored), seq.generator)  # a full draw without replacement
        support = torch.from_numpy(stored)
        out, qs, remaining = [], [], tempered.clone()
        for j in order:
            row = torch.zeros(self.vocab)
            row[support] = remaining / remaining.sum()  # draw j came from what earlier draws left
            out.append(int(stored[j])), qs.append(row)
            remaining[j] = 0.0
        return out, qs

    # --- learning from verification ---------------------------------------------------------------

    def observe(self, seq: Sequence, draft: Draft, verdict: Verdict, scores: Scores) -> None:
        self._remember(seq, draft, verdict, scores.logits)
        self._count_acceptance(draft, verdict)
        self.steps += 1
        if self.steps % self.opts.reshape_every == 0:
            self.shape = self._grow()

    def _remember(self, seq, draft, verdict, logits) -> None:
        """Store the target's distribution after every node of the draft under that node's context."""
        top = torch.topk(torch.log_softmax(logits[: draft.size].float(), dim=-1), self.opts.k, dim=-1)
        probs, ids = top.values.exp().double().cpu().numpy(), top.indices.cpu().numpy()  # [N, k]
        before = len(seq.tokens) - verdict.accepted - 1  # tokens up to and including the root
        contexts = [seq.tokens[max(0, before - self.opts.n):before]]
        tokens = draft.tree.tokens.tolist()
        for i, parent in enumerate(draft.tree.parents):
            if i:
                contexts.append((contexts[parent] + [tokens[i]])[-self.opts.n:])
            self.memory.update(contexts[i], ids[i], probs[i])

    def _count_acceptance(self, draft: Draft, verdict: Verdict) -> None:
        accepted, tree = set(verdict.path), draft.tree
        own = draft.size - draft.forced  # the grammar's forced chain, hung below, is not of its shape
        for i, (parent, depth, rank) in enumerate(zip(tree.parents[:own], tree.depths, tree.ranks)):
            if i and parent in accepted:
                self.trials[depth, rank] += 1
                self.hits[depth, rank] += i in accepted

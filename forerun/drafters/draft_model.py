"""A separate, smaller draft model with the target's tokenizer, drafting a chain or a tree.

Two tree shapes (option `tree`), both grown with one draft-model forward per level:
- "beam" (default): the `tree_width` most probable nodes of the newest level (by cumulative draft
  probability) each get `tree_width` children. With tree_width 1 this is a chain.
- "dynamic": best-first growth under a node budget (`nodes`, at most `branch` children per node),
  EAGLE-2 / DySpec style: the tree goes deep where the draft is confident and wide where it is not.
Children are the top-k when greedy, and Gumbel-top-k draws (sampling without replacement) when
sampling, which recursive rejection sampling verifies exactly (RSD).
Each request keeps the draft model's KV in a store of its own (DraftCache, from begin; slot i holds
position i); entries that match the committed sequence are reused from step to step. So a step drafts
for its sequences one at a time (Drafter.propose_batch's default): one forward reads one store, and
drafting a batch in one forward per level would first need the draft model's KV in one pooled store
with slots per request, which rasd's scoring forward would have to address too.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from forerun.cache import KVCache
from forerun.drafters.base import Drafter, SequenceView, room
from forerun.drafters.registry import register
from forerun.models.batch import ForwardBatch
from forerun.sampling import gumbel_top_k, target_probs
from forerun.tree import Tree, TreeShape
from forerun.types import Draft

# Draft-cache slots past a request's longest sequence, for the tree nodes of one step (the engine
# never lets a verification hold more: EngineConfig.max_draft_rows).
TREE_SLOTS = 256


@dataclass(frozen=True)  # not slotted: the class attributes are the defaults
class DraftTreeOptions:
    tree: str = "beam"  # "beam" (tree_width children for the tree_width best nodes per level) or "dynamic"
    nodes: int = 32  # dynamic: tree size, root included
    branch: int = 8  # dynamic: most children per node

    @classmethod
    def from_spec(cls, spec) -> DraftTreeOptions:
        opts = cls(**spec.option_values({"tree": cls.tree, "nodes": cls.nodes, "branch": cls.branch}))
        if opts.tree not in ("beam", "dynamic") or opts.nodes < 2 or opts.branch < 1:
            raise ValueError(f"draft needs tree in (beam, dynamic), nodes >= 2, branch >= 1; got {opts}")
        return opts


@dataclass(eq=False)
class DraftCache:
    """One request's draft-model KV: slot i holds position i of `tokens`."""

    cache: KVCache
    tokens: list[int]


@register("draft")
class DraftModel(Drafter):
    drafts_with_model = True

    def __init__(self, target, spec, draft=None):
        super().__init__(target, spec)
        if draft is None:
            if not spec.draft_model:
                raise ValueError("method 'draft' needs a draft model (--draft-model PATH)")
            from forerun.models.runtime import load
            draft = load(spec.draft_model, dtype=str(target.model.dtype).removeprefix("torch."),
                         device=str(target.device))
        _check_tokenizers(target, draft)
        self.opts = DraftTreeOptions.from_spec(spec)
        self.draft = draft

    def begin(self, seq: SequenceView) -> DraftCache:
        slots = len(seq.tokens) + seq.params.max_new_tokens + TREE_SLOTS + 1
        return DraftCache(self.draft.model.new_cache(slots), [])

    def propose(self, seq: SequenceView, depth: int) -> Draft:
        state: DraftCache = seq.draft_state
        reuse = _common_prefix(state.tokens, seq.tokens[:-1])
        base = len(seq.tokens) - 1  # the root's slot; node i of the tree goes to slot base + i
        pending = seq.tokens[reuse:]  # uncached context, then the root
        hidden = self.draft.model(ForwardBatch.contiguous(torch.tensor(pending), torch.arange(reuse, base + 1), reuse,
                                                          logits=False), state.cache).hidden[-1:]
        grow = self._grow_dynamic if self.opts.tree == "dynamic" else self._grow_beam
        tree = _GrowingTree(tokens=[seq.root], parents=[-1], q_rows=[None], score=[0.0], base=base, cache=state.cache)
        forwarded = grow(tree, hidden, seq, depth)
        # Slots base.. hold tree nodes by index; the chain prefix of the tree is a valid sequence.
        parents = tree.parents
        chain_len = next((i for i, p in enumerate(parents) if p != i - 1), len(parents))
        state.tokens = seq.tokens[:-1] + tree.tokens[:min(chain_len, forwarded)]
        q = None if seq.params.greedy else torch.stack([torch.zeros_like(tree.q_rows[1]) if r is None else r
                                                        for r in tree.q_rows])
        return Draft(Tree(tokens=torch.tensor(tree.tokens), parents=parents), q=q)

    def _grow_beam(self, tree: _GrowingTree, hidden: torch.Tensor, seq: SequenceView, depth: int) -> int:
        """Level by level: the `tree_width` best nodes of the newest level get `tree_width` children
        each. Returns how many nodes (a prefix) went through the draft model."""
        width, level = self.spec.tree_width, [0]  # level: the nodes whose outputs `hidden` holds
        for d in range(depth):
            logits = self.draft.model.head(hidden).float().cpu()  # [len(level), V]
            expand = sorted(range(len(level)), key=lambda j: -tree.score[level[j]])[:width]
            lo = tree.size
            for j in expand:
                for token, q, logp in _children(logits[j], width, seq.params, seq.generator):
                    tree.add(level[j], token, q, logp)
            if d == depth - 1:
                return lo
            hidden = self._run(tree, lo)
            level = list(range(lo, tree.size))
        return tree.size

    def _grow_dynamic(self, tree: _GrowingTree, hidden: torch.Tensor, seq: SequenceView, depth: int) -> int:
        """Best-first growth under a node budget (EAGLE-2 / DySpec): each round adds the candidate
        children with the highest cumulative draft log-probability, anywhere in the tree, then runs
        the new nodes through the draft model in one forward to offer their own children.

        A candidate is "the next child of node u", valued before it is drawn: at temperature 0 by its
        known probability, when sampling by the expected probability of the next draw without
        replacement. Whether a child is drafted thus never depends on the child's own token, so its
        siblings are tried in draw order and recursive rejection sampling stays exact."""
        limit = min(self.opts.nodes, room(seq))
        per_round = max(1, -(-(limit - 1) // depth))
        offers: dict[int, list] = {}  # node -> its children in draw order: (token, q, logp)
        values: dict[int, list[float]] = {}  # node -> value of each of those, as known before its draw
        frontier: list[tuple[float, int, int]] = []  # (-value, node, child index)

        def offer(node: int, logits: torch.Tensor) -> None:
            offers[node], values[node] = _ranked_children(logits, self.opts.branch, seq.params, seq.generator)
            heapq.heappush(frontier, (-(tree.score[node] + values[node][0]), node, 0))

        offer(0, self.draft.model.head(hidden).float().cpu()[0])
        for round_ in range(depth):
            lo = tree.size
            while frontier and tree.size - lo < per_round and tree.size < limit:
                _, node, j = heapq.heappop(frontier)
                tree.add(node, *offers[node][j])
                if j + 1 < len(offers[node]):
                    heapq.heappush(frontier, (-(tree.score[node] + values[node][j + 1]), node, j + 1))
            if tree.size == lo or round_ == depth - 1 or tree.size >= limit:
                return lo
            logits = self.draft.model.head(self._run(tree, lo)).float().cpu()  # [size - lo, V]
            for node, row in zip(range(lo, tree.size), logits):
                offer(node, row)
        return tree.size

    def _run(self, tree: _GrowingTree, lo: int) -> torch.Tensor:
        """Run nodes [lo, size) through the draft model (attending to their ancestors); their hidden states."""
        hi, shape = tree.size, TreeShape(list(tree.parents))  # a copy: the tree grows on
        mask = shape.mask[lo:hi, :hi]
        positions = torch.tensor(shape.depths[lo:hi]) + tree.base
        batch = ForwardBatch.contiguous(torch.tensor(tree.tokens[lo:hi]), positions, tree.base + lo, mask, logits=False)
        return self.draft.model(batch, tree.cache).hidden


@dataclass(slots=True)
class _GrowingTree:
    """A draft tree being grown; node i's K/V go to draft-cache slot base + i."""

    tokens: list[int]
    parents: list[int]
    q_rows: list[torch.Tensor | None]  # the distribution each node was drawn from (None: argmax)
    score: list[float]  # cumulative draft log-probability of each node's path
    base: int
    cache: KVCache  # the request's draft-model store

    @property
    def size(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, q: torch.Tensor | None, logp: float) -> None:
        self.tokens.append(token), self.parents.append(parent), self.q_rows.append(q)
        self.score.append(self.score[parent] + logp)


def _children(logits: torch.Tensor, width: int, params, generator):
    """(token, proposal distribution or None, log-probability) for each child of one node."""
    probs = torch.softmax(logits, dim=-1) if params.greedy else target_probs(logits, params)
    if params.greedy:
        top = torch.topk(probs, width)
        return [(int(t), None, float(p.log())) for t, p in zip(top.indices, top.values)]
    out, remaining = [], probs.clone()
    for t in gumbel_top_k(probs, width, generator):
        q = remaining / remaining.sum()  # sibling j was drawn from q without the earlier siblings
        out.append((t, q, float(probs[t].log())))
        remaining[t] = 0.0
    return out


def _ranked_children(logits: torch.Tensor, width: int, params, generator) -> tuple[list, list[float]]:
    """_children, plus each child's value as known before it is drawn: its log-probability when
    greedy; when sampling, log E[q(next draw)] = log(sum of q^2 over undrawn / undrawn mass)."""
    kids = _children(logits, width, params, generator)
    if params.greedy:
        return kids, [logp for _, _, logp in kids]
    probs = target_probs(logits, params)
    square, mass, values = float((probs * probs).sum()), 1.0, []
    for _, _, logp in kids:
        values.append(math.log(max(square, 1e-30) / max(mass, 1e-30)))
        p = math.exp(logp)
        square, mass = square - p * p, mass - p
    return kids, values


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _check_tokenizers(target, draft) -> None:
    if target.tokenizer is None or draft.tokenizer is None:
        if target.model.args.vocab_size != draft.model.args.vocab_size:
            raise ValueError("draft and target models have different vocabularies")
        return
    if not draft.tokenizer.same_vocab(target.tokenizer):
        raise ValueError(f"draft model {draft.name!r} does not share the tokenizer of {target.name!r}; "
                         "speculative decoding with a draft model needs the same vocabulary")

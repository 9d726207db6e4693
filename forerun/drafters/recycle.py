"""Token Recycling (Luo et al. 2024): draft from the target's own past top-k predictions.

An adjacency matrix holds, for every token t, the k tokens the target most recently ranked highest
right after t. Verification computes the target's logits at every draft node, rejected branches
included, so each step refreshes the rows of every token in the tree for free ("recycling" the
candidates a plain decoder would throw away). A draft is a breadth-first walk of a static tree
shape: node (parent, rank r) gets token successors[token(parent), r]. The matrix lives on the
drafter, so it persists across requests and is shared by every sequence of a batch: 49152 x 8 int32
= 1.5 MB for SmolLM2's vocabulary.
Drafts are deterministic (q is None), which both verifiers accept exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from forerun.drafters.base import Drafter, Sequence, room
from forerun.drafters.registry import register
from forerun.drafters.tree_shape import RANK_PRIOR, cut_shape, grow_shape
from forerun.tree import Tree
from forerun.types import Draft, Scores, Verdict


@dataclass(frozen=True)  # not slotted: the class attributes are the defaults
class RecycleOptions:
    k: int = 8  # successors kept per token (matrix columns)
    nodes: int = 40  # tree size, root included
    depth: int = 6  # deepest level of the tree shape

    @classmethod
    def from_spec(cls, spec) -> RecycleOptions:
        opts = cls(**spec.option_values({"k": cls.k, "nodes": cls.nodes, "depth": cls.depth}))
        if not 1 <= opts.k <= len(RANK_PRIOR) or opts.nodes < 1 or opts.depth < 1:
            raise ValueError(f"recycle needs 1 <= k <= {len(RANK_PRIOR)}, nodes >= 1, depth >= 1; got {opts}")
        return opts


@register("recycle")
class TokenRecycling(Drafter):
    def __init__(self, target, spec):
        super().__init__(target, spec)
        opts = RecycleOptions.from_spec(spec)
        self.k = opts.k
        # successors[t]: the target's top-k next tokens after t, best first; -1 = never seen
        self.successors = np.full((target.model.args.vocab_size, opts.k), -1, dtype=np.int32)  # [V, k]
        self.shape = grow_shape(lambda depth, rank: RANK_PRIOR[rank], opts.nodes, opts.depth, opts.k)

    def propose(self, seq: Sequence, depth: int) -> Draft:
        shape = cut_shape(self.shape, room(seq), depth)
        tokens, parents = [seq.root], [-1]
        placed = {0: 0}  # shape node -> draft node; nodes under an unknown successor are dropped
        for i in range(1, shape.size):
            parent = placed.get(shape.parents[i])
            if parent is None:
                continue
            token = int(self.successors[tokens[parent], shape.ranks[i]])
            if token >= 0:
                placed[i] = len(tokens)
                tokens.append(token), parents.append(parent)
        return Draft(Tree(tokens=torch.tensor(tokens), parents=parents))

    def observe(self, seq: Sequence, draft: Draft, verdict: Verdict, scores: Scores) -> None:
        top = torch.topk(scores.logits[: draft.size], self.k, dim=-1).indices  # [N, k]
        self.successors[draft.tree.tokens.numpy()] = top.to(torch.int32).cpu().numpy()

"""Tree shapes for model-free tree drafters: which (parent, sibling rank) slots a draft fills.

A shape is data, as in Medusa: node 0 is the root and node i > 0 is the `ranks[i]`-th child of
`parents[i]`. Shapes are grown best-first from an acceptance estimate a(depth, rank): a node's value
is the product of a() along its path, i.e. the chance it is accepted if the estimates are right.
A node's next sibling enters the frontier only once the node itself is in, so every node's children
are a prefix of its ranks. That matters for sampling without replacement: the j-th draw may be
verified only if the draws before it were (verify.verify_stochastic tries siblings in draw order).
"""
from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

# Prior chance that a drafter's r-th ranked guess is the next token: a shape grown from it puts most
# nodes on rank-0 chains and spends the rest on second and third guesses near the root.
RANK_PRIOR = (0.6, 0.2, 0.1, 0.06, 0.04, 0.03, 0.02, 0.015)


@dataclass(frozen=True, slots=True)
class TreeShape:
    parents: list[int]  # [N]; parents[0] == -1; nodes ordered by value, so parents come first
    ranks: list[int]  # [N]; node i is the ranks[i]-th child of its parent (ranks[0] == 0, unused)
    depths: list[int]  # [N]

    @property
    def size(self) -> int:
        return len(self.parents)

    def cut(self, nodes: int, depth: int) -> TreeShape:
        """The `nodes` most valuable nodes no deeper than `depth` (still a tree: ancestors are kept
        before descendants and are shallower)."""
        keep = [i for i in range(self.size) if self.depths[i] <= depth][:nodes]
        index = {old: new for new, old in enumerate(keep)}
        return TreeShape(parents=[index.get(self.parents[i], -1) for i in keep],
                         ranks=[self.ranks[i] for i in keep], depths=[self.depths[i] for i in keep])


def grow_shape(accept: Callable[[int, int], float], nodes: int, max_depth: int, max_rank: int) -> TreeShape:
    """Best-first growth to `nodes` nodes (root included); accept(depth, rank) in (0, 1]."""
    parents, ranks, depths = [-1], [0], [0]
    value = [1.0]
    frontier = [(-accept(1, 0), 0, 0)]  # (-value, parent, rank)
    while frontier and len(parents) < nodes:
        neg, parent, rank = heapq.heappop(frontier)
        node, depth = len(parents), depths[parent] + 1
        parents.append(parent), ranks.append(rank), depths.append(depth), value.append(-neg)
        if rank + 1 < max_rank:
            heapq.heappush(frontier, (-value[parent] * accept(depth, rank + 1), parent, rank + 1))
        if depth < max_depth:
            heapq.heappush(frontier, (-value[node] * accept(depth + 1, 0), node, 0))
    return TreeShape(parents, ranks, depths)


def sibling_ranks(parents: list[int]) -> list[int]:
    """ranks[i]: how many earlier siblings node i has (its draw order among its parent's children)."""
    seen: dict[int, int] = {}
    ranks = []
    for p in parents:
        ranks.append(seen.get(p, 0))
        seen[p] = ranks[-1] + 1
    return ranks

"""Tree shapes for model-free tree drafters: which (parent, sibling rank) slots a draft fills.

A shape is data, as in Medusa (forerun.tree.TreeShape): node 0 is the root and node i > 0 is the
`ranks[i]`-th child of `parents[i]`, its rank counting its earlier siblings. Shapes are grown
best-first from an acceptance estimate a(depth, rank): a node's value is the product of a() along its
path, i.e. the chance it is accepted if the estimates are right. A node's next sibling enters the
frontier only once the node itself is in, so the rank a node is grown for is its rank in the shape,
and every node's children are a prefix of its ranks. That matters for sampling without replacement:
the j-th draw may be verified only if the draws before it were (verify.verify_stochastic tries
siblings in draw order).
"""
from __future__ import annotations

import heapq
from collections.abc import Callable

from forerun.tree import TreeShape

# Prior chance that a drafter's r-th ranked guess is the next token: a shape grown from it puts most
# nodes on rank-0 chains and spends the rest on second and third guesses near the root.
RANK_PRIOR = (0.6, 0.2, 0.1, 0.06, 0.04, 0.03, 0.02, 0.015)


def cut_shape(shape: TreeShape, nodes: int, depth: int) -> TreeShape:
    """The `nodes` most valuable nodes of a grown shape no deeper than `depth` (still a tree:
    ancestors are kept before descendants and are shallower)."""
    return shape.subtree([i for i in range(shape.size) if shape.depths[i] <= depth][:nodes])


def grow_shape(accept: Callable[[int, int], float], nodes: int, max_depth: int, max_rank: int) -> TreeShape:
    """Best-first growth to `nodes` nodes (root included); accept(depth, rank) in (0, 1]."""
    parents, depths = [-1], [0]
    value = [1.0]
    frontier = [(-accept(1, 0), 0, 0)]  # (-value, parent, rank)
    while frontier and len(parents) < nodes:
        neg, parent, rank = heapq.heappop(frontier)  # rank: the new node's earlier siblings are all in
        node, depth = len(parents), depths[parent] + 1
        parents.append(parent), depths.append(depth), value.append(-neg)
        if rank + 1 < max_rank:
            heapq.heappush(frontier, (-value[parent] * accept(depth, rank + 1), parent, rank + 1))
        if depth < max_depth:
            heapq.heappush(frontier, (-value[node] * accept(depth + 1, 0), node, 0))
    return TreeShape(parents)


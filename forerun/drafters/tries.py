"""Token tries: candidate continuations of the root merged on shared prefixes into one draft tree.

Used by the drafters whose candidates come from a store rather than a model (retrieval, lookahead):
a branch is a token list that would follow the root, and every node counts the branches through it.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from forerun.tree import Tree


class Trie:
    """Nodes in insertion order, so parents[i] < i (the order a Tree needs)."""

    def __init__(self, root: int):
        self.tokens: list[int] = [root]
        self.parents: list[int] = [-1]
        self.counts: list[float] = [0.0]
        self._child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node

    def add(self, branch: Iterable[int], weight: float = 1.0) -> None:
        node = 0
        self.counts[0] += weight
        for token in branch:
            node = self.child(node, int(token))
            self.counts[node] += weight

    def child(self, parent: int, token: int) -> int:
        """The node for `token` under `parent`, created (with count 0) if missing."""
        key = (parent, token)
        if key not in self._child:
            self._child[key] = len(self.tokens)
            self.tokens.append(token), self.parents.append(parent), self.counts.append(0.0)
        return self._child[key]

    def pruned(self, budget: int) -> Tree:
        """The root plus the `budget` most counted nodes."""
        return prune(Tree(tokens=torch.tensor(self.tokens), parents=list(self.parents)), budget, self.counts)


def prune(tree: Tree, budget: int, score: list[float]) -> Tree:
    """The root plus the `budget` best nodes of a tree by score. Scores must never grow from parent to
    child; ties go to the shallower, then the older node, so every kept node's parent is kept."""
    ranked = sorted(range(1, tree.size), key=lambda i: (-score[i], tree.depths[i], i))
    return tree.subtree(sorted([0, *ranked[:max(budget, 0)]]))

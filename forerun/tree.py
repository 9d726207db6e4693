"""Token trees as data. A parent list is compiled once, on first use, into what every stage reads:
depths (position offsets), the ancestor mask (attention), children (verification), sibling ranks and
rank paths (the goodput policy's odds); and a tree is cut into a subtree by one renumbering.

A TreeShape is where the nodes sit; a Tree is a shape with a token at every node. Node 0 is the root
and parents come before their children, so one pass in node order computes anything that flows down
from the root. A chain is the degenerate tree whose node i has parent i - 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


# Not slotted: cached_property keeps each result in the instance's __dict__, which a frozen dataclass
# still lets it write. No generated __eq__ (a Tree's tokens compare element-wise): trees compare by identity.
@dataclass(frozen=True, eq=False)
class TreeShape:
    """Where a tree's nodes sit, and the structure compiled from that, each part on first use."""

    parents: list[int]  # [N]; parents[0] == -1 and 0 <= parents[i] < i; never mutated once built

    def __post_init__(self) -> None:
        ordered = all(0 <= p < i for i, p in enumerate(self.parents[1:], 1))
        if not self.parents or self.parents[0] != -1 or not ordered:
            raise ValueError(f"not a tree rooted at node 0 with parents before children: {self.parents}")

    @property
    def size(self) -> int:
        return len(self.parents)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        """[N] each node's distance from the root (the root is at depth 0)."""
        out: list[int] = [0]
        for p in self.parents[1:]:
            out.append(out[p] + 1)
        return tuple(out)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """[N] each node's children, in node order."""
        kids: list[list[int]] = [[] for _ in self.parents]
        for i, p in enumerate(self.parents[1:], 1):
            kids[p].append(i)
        return tuple(map(tuple, kids))

    @cached_property
    def mask(self) -> Tensor:
        """[N, N] bool: node i may attend to node j iff j is i or one of its ancestors."""
        mask = torch.eye(self.size, dtype=torch.bool)
        for i, p in enumerate(self.parents[1:], 1):
            mask[i] |= mask[p]
        return mask

    @cached_property
    def ranks(self) -> tuple[int, ...]:
        """[N] sibling ranks: how many earlier siblings each node has, i.e. its draw order among its
        parent's children (the root's is 0)."""
        seen: dict[int, int] = {}
        out = []
        for p in self.parents:
            out.append(seen.get(p, 0))
            seen[p] = out[-1] + 1
        return tuple(out)

    @cached_property
    def rank_paths(self) -> tuple[tuple[int, ...], ...]:
        """[N] each node's path of sibling ranks from the root (the root's is ()): where it sits,
        whatever its tokens. (0,) is the root's first child, (0, 1) that child's second child."""
        out: list[tuple[int, ...]] = [()]
        for i, p in enumerate(self.parents[1:], 1):
            out.append(out[p] + (self.ranks[i],))
        return tuple(out)

    @cached_property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def subtree(self, keep: list[int]) -> TreeShape:
        """The shape of the nodes in `keep`, renumbered in its order (see _renumbered)."""
        return TreeShape(self._renumbered(keep))

    def _renumbered(self, keep: list[int]) -> list[int]:
        """The parents of the nodes in `keep` as indices into `keep`, which must be sorted, start at the
        root and hold every kept node's parent."""
        if not keep or keep[0] != 0:
            raise ValueError(f"a subtree keeps the root first: {keep}")
        index = {old: new for new, old in enumerate(keep)}
        return [-1] + [index[self.parents[i]] for i in keep[1:]]


@dataclass(frozen=True, eq=False, kw_only=True)  # keyword only: `tokens` follows the inherited `parents`
class Tree(TreeShape):
    """A shape with a token at every node: the tree part of a draft."""

    tokens: Tensor  # [N] long; node 0 is the root

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens.shape != (self.size,):
            raise ValueError(f"{self.size} parents but tokens of shape {tuple(self.tokens.shape)}")

    def subtree(self, keep: list[int]) -> Tree:
        """The tree of the nodes in `keep` (sorted, root first, closed under parents), renumbered in
        its order; each kept node keeps its token."""
        return Tree(tokens=self.tokens[keep], parents=self._renumbered(keep))

    def path(self, node: int) -> list[int]:
        """The tokens from the root's child down to `node` (empty for the root)."""
        tokens, out = self.tokens.tolist(), []
        while node > 0:
            out.append(tokens[node])
            node = self.parents[node]
        return out[::-1]

    def grown(self, node: int, chain: list[int]) -> Tree:
        """This tree with `chain` (not empty) hung below `node`, one token under the other; the new
        nodes come last."""
        parents = self.parents + [node] + list(range(self.size, self.size + len(chain) - 1))
        return Tree(tokens=torch.cat([self.tokens, torch.tensor(chain, dtype=self.tokens.dtype)]), parents=parents)

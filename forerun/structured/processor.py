"""One sample's grammar state, applied to every node of its draft tree.

The tokens a grammar allows at a position depend only on the tokens before it: the committed ones,
then the path from the tree's root to the node. So the processor walks the tree depth first, a
matcher advanced by each child's token and rolled back after its subtree, and masks each node's row
with what its own path allows. Masked rows are the target's distribution under the constraint, so
greedy verification picks what plain decoding under it picks, and rejection sampling draws from it.
"""
from __future__ import annotations

from functools import cached_property

import llguidance
import torch
from llguidance.torch import fill_next_token_bitmask
from torch import Tensor

from forerun.tree import Tree

SHIFTS = torch.arange(32, dtype=torch.int32)  # a bitmask word's bits, lowest first


class ConstraintBroken(RuntimeError):
    """The grammar library refused a token its own mask allowed: seen where a constraint needs bytes
    the model's vocabulary has no token for (a byte-level vocabulary without some lead bytes of 4-byte
    UTF-8). The request cannot go on under its constraint; the engine fails that request alone."""


class GrammarProcessor:
    """The stateful processor of one sample under a grammar (forerun.logits_process's interface):
    apply() masks a tree's logits, commit() advances past the tokens a step accepted, fork() copies
    the state for another sample of the same prompt."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, words: int, eos_ids: frozenset[int],
                 ended: bool = False):
        self.matcher = matcher  # at the committed tokens
        self.vocab_size = vocab_size  # the logits' width
        self.words = words  # of a bitmask row: 32 ids each, over the tokenizer's ids and the logits'
        # An end token ends the grammar's text: the matcher takes it without counting it as a token
        # (a rollback would undo the one before), so it is never fed to the matcher, and after it only
        # another end token is allowed.
        self.eos_ids = eos_ids
        self.ended = ended
        self._walked: tuple[Tree, Tensor, list[int]] | None = None  # the last tree walked, its masks, its reach

    def apply(self, logits: Tensor, tree: Tree) -> Tensor:
        """logits: [N, V] at the tree's nodes (row i: the next token after the path to node i). Every
        token the grammar rules out there gets -inf. Rows under a node the grammar rules out are left
        as they are: that node is never accepted, so they are never read."""
        allowed = _unpack(self._walk(tree)[0], self.vocab_size).to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def reachable(self, tree: Tree) -> list[int]:
        """The nodes (sorted, the root first) whose paths the grammar allows: the others would be
        rejected whatever the target says, so a deterministic draft loses nothing without them."""
        return self._walk(tree)[1]

    def keep(self, tree: Tree, subtree: Tree, kept: list[int]) -> None:
        """`subtree` is `tree` cut to the nodes `kept` (sorted, from reachable()): its walk is the
        tree's, row for row, so apply() on it needs no second walk."""
        bits = self._walk(tree)[0]
        self._walked = (subtree, bits[kept], list(range(len(kept))))

    def forced(self, tree: Tree, node: int, limit: int) -> list[int]:
        """At most `limit` tokens the grammar forces after the path to `node` (a node reachable() keeps):
        llguidance's fast-forward tokens, those of the bytes every allowed continuation starts with
        (a key, its quotes and colon, the closing braces), less a last one a longer token could swallow."""
        path = tree.path(node)
        if limit <= 0 or self.ended or any(t in self.eos_ids for t in path):
            return []
        for t in path:
            if not self.matcher.consume_token(t):
                raise ConstraintBroken(f"node {node}'s path breaks the grammar: {self.matcher.get_error()}")
        tokens = [] if self.matcher.is_stopped() else self.matcher.compute_ff_tokens()
        self.matcher.rollback(len(path))
        out = []
        for t in tokens[:limit]:
            if t >= self.vocab_size or t in self.eos_ids:
                break
            out.append(t)
        return out

    def commit(self, tokens: list[int]) -> None:
        """The step's accepted tokens, the target's own last: each was allowed where it was drawn."""
        for token in tokens:
            if self.ended or token in self.eos_ids:
                self.ended = True
                continue
            if not self.matcher.consume_token(token):
                raise ConstraintBroken(f"token {token} breaks the grammar: {self.matcher.get_error()}")
        self._walked = None

    def fork(self) -> GrammarProcessor:
        return GrammarProcessor(self.matcher.deep_copy(), self.vocab_size, self.words, self.eos_ids, self.ended)

    @property
    def finished(self) -> bool:
        """The grammar is complete and admits no more tokens (only the end of the sequence), or an end
        token was committed."""
        return self.ended or self.matcher.is_stopped()

    @cached_property
    def _end_only(self) -> Tensor:
        return end_only(self.words, self.eos_ids)

    def _walk(self, tree: Tree) -> tuple[Tensor, list[int]]:
        """[N, words] int32 bitmask rows (all ones at nodes not reached) and the nodes reached."""
        if self._walked is not None and self._walked[0] is tree:
            return self._walked[1], self._walked[2]
        bits = torch.full((tree.size, self.words), -1, dtype=torch.int32)
        tokens, kids, reached = tree.tokens.tolist(), tree.children, []

        def visit(node: int, ended: bool) -> None:
            reached.append(node)
            if ended:
                bits[node] = self._end_only
                return
            fill_next_token_bitmask(self.matcher, bits, node)
            row = bits[node].tolist()
            for child in kids[node]:
                t = tokens[child]
                if t >= self.vocab_size or not row[t >> 5] >> (t & 31) & 1:
                    continue
                if t in self.eos_ids:
                    visit(child, True)
                elif self.matcher.consume_token(t):
                    visit(child, False)
                    self.matcher.rollback(1)

        visit(0, self.ended)
        reached.sort()
        self._walked = (tree, bits, reached)
        return bits, reached


def end_only(words: int, eos_ids: frozenset[int]) -> Tensor:
    """[words] int32: a bitmask row allowing the end tokens alone."""
    row = torch.zeros(words * 32, dtype=torch.bool)
    row[list(eos_ids)] = True
    return (row.view(words, 32).int() << SHIFTS).sum(1, dtype=torch.int64).to(torch.int32)


def _unpack(bits: Tensor, vocab_size: int) -> Tensor:
    """[N, words] int32 bitmask -> [N, vocab_size] bool (bit j of word w is token 32 w + j)."""
    return ((bits.unsqueeze(-1) >> SHIFTS) & 1).bool().flatten(1)[:, :vocab_size]

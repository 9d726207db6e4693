"""Prompt lookup decoding: copy what followed the latest earlier occurrence of the context's suffix.

Matches the longest suffix n-gram (ngram_max down to ngram_min) anywhere in prompt + generated text
and proposes the tokens that followed it. Free to compute; wins where the output repeats its input
(summaries, code edits, extraction, RAG), proposes nothing on free-form text.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from forerun.drafters.base import Drafter, Sequence, chain, room, root_only
from forerun.drafters.registry import register
from forerun.types import Draft


def lookup(tokens: np.ndarray, n_max: int, n_min: int, k: int) -> tuple[list[int], int]:
    """Up to k tokens that followed the most recent earlier match of the longest suffix n-gram, and
    that n (0: no match). Anchored on the last token: one pass over the text finds where it occurs
    earlier, and only those places are checked for the tokens before it (a few microseconds where
    comparing every window of every n took a hundred)."""
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # where an earlier match would end
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        found = ends[ends >= n - 1]
        for back in range(1, n):
            found = found[tokens[found - back] == tokens[-1 - back]]
        if found.size:
            start = found[-1] + 1
            return tokens[start:start + k].tolist(), n
    return [], 0


class TokenArray:
    """A sequence's tokens as a numpy array, grown by what each step appended, instead of a list
    converted whole at every step."""

    __slots__ = ("array", "size")

    def __init__(self):
        self.array, self.size = np.empty(0, np.int64), 0

    def of(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        if n < self.size or (self.size and tokens[self.size - 1] != self.array[self.size - 1]):
            self.size = 0  # the list was cut, or its last token seen changed: copy it again
        if n > self.array.size:
            grown = np.empty(max(2 * self.array.size, n, 256), np.int64)
            grown[:self.size] = self.array[:self.size]
            self.array = grown
        self.array[self.size:n] = tokens[self.size:n]
        self.size = n
        return self.array[:n]


@register("pld")
class PromptLookup(Drafter):
    keyed = True

    def begin(self, seq: Sequence) -> TokenArray:
        return TokenArray()

    def propose(self, seq: Sequence, depth: int) -> Draft:
        length = min(depth, room(seq) - 1)
        tokens = seq.draft_state.of(seq.tokens) if isinstance(seq.draft_state, TokenArray) else np.asarray(seq.tokens)
        found, n = lookup(tokens, self.spec.ngram_max, self.spec.ngram_min, length)
        if not found:
            return root_only(seq)
        return replace(chain(seq, found), key=n)  # a longer match is a better guess

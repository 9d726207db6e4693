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
    that n (0: no match)."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # starts 0 .. L-1-n
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = hits[-1] + n
            return tokens[start:start + k].tolist(), n
    return [], 0


@register("pld")
class PromptLookup(Drafter):
    keyed = True

    def propose(self, seq: Sequence, depth: int) -> Draft:
        length = min(depth, room(seq) - 1)
        found, n = lookup(np.asarray(seq.tokens), self.spec.ngram_max, self.spec.ngram_min, length)
        if not found:
            return root_only(seq)
        return replace(chain(seq, found), key=n)  # a longer match is a better guess

"""Lookahead decoding (Fu et al. 2024): Jacobi iteration feeds an n-gram pool, in the same forward.

Every verification forward also carries a *lookahead branch* (Draft.extra): a window of W columns
and up to N - 1 levels of guessed tokens, the trajectory of the last Jacobi iterations. Level 0 sits
at depths 1..W after the root and is causal within itself; level l of column i sits at depth
i + l + 1 and sees level 0 up to column i plus the levels above it in column i, so every window
token sees a contiguous guessed sequence. The target's argmax at the last level gives a new level
one position further on; each column's diagonal (level 0 .. N - 2, then the new token) is an n-gram
the model itself produced, and goes into the pool under its first token. The window then drops its
oldest level and appends the new one.

The *verification branch* is the draft tree: the pool's most recent n-grams starting with the root
(up to G), merged on shared prefixes. They are deterministic (q = None), so verification is exact
at any temperature; the window is only ever read as a source of guesses. The pool is also seeded
with the prompt's n-grams and grows with the accepted text (as in LADE's pool-from-prompt).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch

from forerun.drafters.base import Drafter, Sequence, room
from forerun.drafters.registry import register
from forerun.drafters.tries import Trie
from forerun.types import Draft, Extra, Scores


@dataclass(frozen=True, slots=True)
class LookaheadOptions:
    window: int = 4  # W: columns of the Jacobi window
    ngram: int = 4  # N: n-gram length (the window holds N - 1 levels; drafts are N - 1 deep)
    candidates: int = 4  # G: n-grams verified per step
    pool_from_prompt: bool = True  # seed the pool with the prompt's n-grams


@dataclass(eq=False)
class LookaheadState:
    """One request's window and pool (both start from its prompt)."""

    pool: dict[int, OrderedDict[tuple[int, ...], None]]  # first token -> continuations, most recent last
    levels: list[list[int]]  # [levels][W] the window, oldest level first
    seen: int  # tokens of the sequence whose n-grams are in the pool


@register("lookahead")
class Lookahead(Drafter):
    def __init__(self, target, spec):
        super().__init__(target, spec)
        self.opts = LookaheadOptions(**spec.option_values({f.name: f.default for f in fields(LookaheadOptions)}))
        if self.opts.window < 1 or self.opts.ngram < 2 or self.opts.candidates < 1:
            raise ValueError("lookahead needs window >= 1, ngram >= 2 and candidates >= 1")

    def begin(self, seq: Sequence) -> LookaheadState:
        w = self.opts.window
        state = LookaheadState(pool={}, levels=[(seq.tokens * w)[-w:]], seen=0)  # the paper starts from the prompt
        if self.opts.pool_from_prompt:
            self._add_text(state, seq.tokens)
        state.seen = len(seq.tokens)
        return state

    def propose(self, seq: Sequence, depth: int) -> Draft:
        state: LookaheadState = seq.draft_state
        trie = Trie(seq.root)
        for gram in list(state.pool.get(seq.root, ()))[-self.opts.candidates:]:
            trie.add(gram)
        space = room(seq)
        tree = trie.pruned(min(len(trie.tokens), space) - 1)
        window = self._window(state, tree.size)
        if window is not None and tree.size + window.tokens.shape[0] > space:
            window = None  # near the end of the room: verify only
        return Draft(tree, extra=window)

    def observe(self, seq: Sequence, draft: Draft, verdict, scores: Scores) -> None:
        state: LookaheadState = seq.draft_state
        self._add_text(state, seq.tokens[max(state.seen - self.opts.ngram + 1, 0):])
        state.seen = len(seq.tokens)
        if draft.extra is None:
            return
        w = self.opts.window
        new = scores.logits[-w:].argmax(-1).tolist()  # the last level's predictions: one position further
        if len(state.levels) == self.opts.ngram - 1:
            for i in range(w):
                self._add(state, tuple(level[i] for level in state.levels) + (new[i],))
            state.levels = state.levels[1:]
        state.levels.append(new)

    def _window(self, state: LookaheadState, tree_nodes: int) -> Extra | None:
        """The lookahead branch as extra nodes: level-major, column-minor."""
        w, levels = self.opts.window, len(state.levels)
        m = w * levels
        tokens = torch.tensor([t for level in state.levels for t in level])
        col = torch.arange(m) % w
        lvl = torch.arange(m) // w
        mask = torch.zeros(m, tree_nodes + m, dtype=torch.bool)
        mask[:, 0] = True  # the root
        sees_level0 = (lvl[None, :] == 0) & (col[None, :] <= col[:, None])  # level 0 up to my column
        own_column = (lvl[None, :] > 0) & (col[None, :] == col[:, None]) & (lvl[None, :] <= lvl[:, None])
        mask[:, tree_nodes:] = sees_level0 | own_column
        return Extra(tokens=tokens, depths=col + lvl + 1, mask=mask)

    def _add_text(self, state: LookaheadState, tokens: list[int]) -> None:
        n = self.opts.ngram
        for i in range(len(tokens) - n + 1):
            self._add(state, tuple(tokens[i:i + n]))

    def _add(self, state: LookaheadState, gram: tuple[int, ...]) -> None:
        """Most recent last; each first token keeps a bounded, de-duplicated list."""
        grams = state.pool.setdefault(gram[0], OrderedDict())
        grams.pop(gram[1:], None)
        grams[gram[1:]] = None
        if len(grams) > 4 * self.opts.candidates:
            grams.popitem(last=False)

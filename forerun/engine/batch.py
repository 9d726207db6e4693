"""Packing a step's work into one ForwardBatch: each sequence's pending tokens, then its draft."""
from __future__ import annotations

import torch
from torch import Tensor

from forerun.engine.scheduler import Work
from forerun.models.batch import ForwardBatch, Segment
from forerun.types import Draft


def draft_layout(draft: Draft) -> tuple[Tensor, Tensor, Tensor | None]:
    """The rows a draft adds to a forward: tokens [N + M], position offsets from the root [N + M],
    and the mask among them ([N + M, N + M] bool; None for a chain, which is causal)."""
    tree, extra = draft.tree, draft.extra
    tokens, offsets = tree.tokens, torch.tensor(tree.depths)
    if extra is None:
        return tokens, offsets, None if tree.is_chain else tree.mask
    m = extra.tokens.shape[0]
    mask = torch.cat([torch.nn.functional.pad(tree.mask, (0, m)), extra.mask])
    return torch.cat([tokens, extra.tokens]), torch.cat([offsets, extra.depths]), mask


def segment(w: Work, draft: Draft | None) -> Segment:
    """One sequence's rows: `w.chunk` pending tokens at their positions (causal), then (when it
    decodes) the draft rooted at the next position, whose rows see every pending row and need logits.
    A scored sequence never decodes; its chunk's rows from its next scored position need logits."""
    seq, chunk = w.seq, w.chunk
    first = seq.cached + chunk  # the root's position and logical slot
    tokens = torch.tensor(seq.tokens[seq.cached:first], dtype=torch.long)
    positions = torch.arange(seq.cached, first)
    mask = None
    if draft is not None:
        rows, offsets, tree = draft_layout(draft)
        if tree is not None:
            mask = torch.ones(chunk + draft.rows, chunk + draft.rows, dtype=torch.bool).tril()
            mask[chunk:, chunk:] = tree
        tokens, positions = torch.cat([tokens, rows]), torch.cat([positions, first + offsets])
    return Segment(tokens, positions, seq.slots(0, seq.cached + tokens.shape[0]), mask,
                   logits_from=chunk if draft is not None else chunk - scored_rows(w))


def scored_rows(w: Work) -> int:
    """The rows of w's chunk that a scored sequence needs logits for: its last ones."""
    scoring = w.seq.scoring
    if scoring is None:
        return 0
    return max(w.seq.cached + w.chunk - max(scoring.start, w.seq.cached), 0)


def pack(work: list[Work], drafts: dict[int, Draft]) -> ForwardBatch:
    """drafts: the draft of each decoding sequence, by its index in `work`."""
    return ForwardBatch.pack([segment(w, drafts.get(i)) for i, w in enumerate(work)])

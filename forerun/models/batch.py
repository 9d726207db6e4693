"""What one forward of a model takes and gives back: the rows of many sequences, flattened.

Each sequence contributes its own rows (a prompt chunk, one token, a whole draft tree) with explicit
positions. Its keys are a list of KV-pool slots: its cached prefix, then its own rows, whose K/V the
forward writes into those last slots. A row attends to exactly its own sequence's keys: the whole
prefix, and among the newest keys those its mask allows (causal when there is no mask).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from forerun import kernels


@dataclass(frozen=True, slots=True)
class Segment:
    """One sequence's share of a forward."""

    tokens: Tensor  # [T] long
    positions: Tensor  # [T] long: rotary positions
    slots: Tensor  # [L] long, L >= T: the sequence's keys as pool slots; its T rows write the last T
    mask: Tensor | None = None  # [T, K] bool over the last K keys (T <= K <= L); None: causal
    logits_from: int = 0  # rows [logits_from, T) need logits; T: none


@dataclass(eq=False)
class ForwardBatch:
    """The rows of every sequence of one forward, flattened. Index tensors live on the CPU."""

    tokens: Tensor  # [R] long
    positions: Tensor  # [R] long
    write_slots: Tensor  # [R] long: the pool slot each row's K/V go to
    row_start: Tensor  # [B + 1] long: sequence b owns rows row_start[b]:row_start[b + 1]
    ctx_slots: Tensor  # [C] long: sequence b's keys are ctx_slots[ctx_start[b]:ctx_start[b + 1]]
    ctx_start: Tensor  # [B + 1] long
    masks: list[Tensor | None]  # [B] of [T_b, K_b] bool over each sequence's last K_b keys, or None (causal)
    logit_rows: Tensor  # [Q] long: the rows whose logits the forward computes
    _native: object = field(default=None, repr=False)  # the kernels' index of this batch, built once

    @staticmethod
    def pack(segments: list[Segment]) -> ForwardBatch:
        rows = torch.tensor([0] + [s.tokens.shape[0] for s in segments]).cumsum(0)
        keys = torch.tensor([0] + [s.slots.shape[0] for s in segments]).cumsum(0)
        logit_rows = [torch.arange(int(r0) + s.logits_from, int(r0) + s.tokens.shape[0])
                      for r0, s in zip(rows[:-1], segments)]
        return ForwardBatch(
            tokens=torch.cat([s.tokens for s in segments]),
            positions=torch.cat([s.positions for s in segments]),
            write_slots=torch.cat([s.slots[s.slots.shape[0] - s.tokens.shape[0]:] for s in segments]).cpu(),
            row_start=rows, ctx_slots=torch.cat([s.slots for s in segments]).cpu(), ctx_start=keys,
            masks=[None if s.mask is None else s.mask.cpu() for s in segments],
            logit_rows=torch.cat(logit_rows))

    @staticmethod
    def contiguous(tokens: Tensor, positions: Tensor, start: int, tree_mask: Tensor | None = None,
                   logits: bool = True) -> ForwardBatch:
        """One sequence in a store of its own (slot i holds its i-th key): the prefix in slots
        [0, start), its rows from `start`; logits for every row, or for none."""
        slots = torch.arange(start + tokens.shape[0])
        return ForwardBatch.pack([Segment(tokens, positions, slots, tree_mask, 0 if logits else tokens.shape[0])])

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def sequences(self) -> int:
        return len(self.masks)

    def rows_of(self, b: int) -> slice:
        return slice(int(self.row_start[b]), int(self.row_start[b + 1]))

    def keys_of(self, b: int) -> Tensor:
        return self.ctx_slots[int(self.ctx_start[b]):int(self.ctx_start[b + 1])]

    def full_mask(self, b: int) -> Tensor:
        """[T_b, L_b] bool: which of sequence b's keys each of its rows sees."""
        rows, keys = self.row_start[b + 1] - self.row_start[b], self.ctx_start[b + 1] - self.ctx_start[b]
        t, length = int(rows), int(keys)
        own = self.masks[b] if self.masks[b] is not None else torch.ones(t, t, dtype=torch.bool).tril()
        prefix = torch.ones(t, length - own.shape[1], dtype=torch.bool)
        return torch.cat([prefix, own], dim=1)

    def windowed(self, window: int) -> ForwardBatch:
        """The batch with every mask cut to a sliding window of `window` positions. A key's position
        is its index in the sequence for the prefix (slot order is position order there) and the
        row's own position for the newest keys."""
        masks = []
        for b in range(self.sequences):
            mask = self.full_mask(b)
            pos = self.positions[self.rows_of(b)].cpu()
            key_pos = torch.arange(mask.shape[1])
            key_pos[mask.shape[1] - pos.shape[0]:] = pos
            masks.append(mask & ((pos[:, None] - key_pos[None, :]) < window))
        return ForwardBatch(self.tokens, self.positions, self.write_slots, self.row_start, self.ctx_slots,
                            self.ctx_start, masks, self.logit_rows)

    def native(self):
        """The batch as the CPU kernels index it (built on first use, then shared by every layer)."""
        if self._native is None:
            flat, start, cols, offset = [], [], [], 0
            for b, mask in enumerate(self.masks):
                if mask is None:
                    start.append(-1)
                    cols.append(int(self.row_start[b + 1] - self.row_start[b]))
                    continue
                start.append(offset)
                cols.append(mask.shape[1])
                flat.append(mask.reshape(-1))
                offset += mask.numel()
            mask = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.bool)
            self._native = kernels.cpu_kernels().Batch(
                self.write_slots, self.row_start, self.ctx_slots, self.ctx_start, mask,
                torch.tensor(start, dtype=torch.long), torch.tensor(cols, dtype=torch.long))
        return self._native


@dataclass(frozen=True, slots=True)
class ForwardOutput:
    logits: Tensor  # [Q, V] float32: the logits of the batch's logit_rows, in that order
    hidden: Tensor  # [R, D]: every row's final-normed hidden state (what the head reads)
    layers: dict[int, Tensor]  # k -> [R, D]: the residual stream after the first k layers, for each k asked

"""KV storage addressed by slot: [layers, kv_heads, slots, head_dim] keys and values.

A forward writes each row's K/V at the slot the batch names (forerun.models.batch) and reads each
sequence's keys by their slots. Who owns which slots is decided elsewhere: the engine's pool hands
out blocks of slots to sequences (forerun.engine.kv_pool); a drafter with a model of its own keeps a
store whose slot i holds position i. Whatever lies in a slot nobody has committed is garbage that the
next write overwrites: there is no rollback.
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, slots: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, num_kv_heads, slots, head_dim)
        # Not zeroed: a slot is always written before anyone reads it, and the pages of a large pool
        # are only touched as sequences fill them.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    @property
    def bytes_per_slot(self) -> int:
        return 2 * self.k[:, :, 0].numel() * self.k.element_size()

    def copy(self, src: Tensor, dst: Tensor) -> None:
        """Copy every layer's entries at slots `src` to slots `dst` ([A] long each, disjoint)."""
        src, dst = src.to(self.k.device), dst.to(self.k.device)
        self.k[:, :, dst] = self.k[:, :, src]
        self.v[:, :, dst] = self.v[:, :, src]

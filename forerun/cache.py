"""Static, position-addressed KV cache.

Slots [0, n) hold the committed sequence, so slot == position there. A verification forward writes
its T tree tokens at slots [n, n + T); committing an accepted path gathers those entries to
[n, n + len(path)). Whatever lies past the committed length is garbage and is simply overwritten by
the next write: there is no rollback.
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v ([T, kv_heads, head_dim]) at slots [start, start + T); return keys and values
        for slots [0, start + T) as [kv_heads, start + T, head_dim] views."""
        end = start + k.shape[0]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: need {end} slots, have {self.max_len}")
        self.k[layer, :, start:end] = k.transpose(0, 1)
        self.v[layer, :, start:end] = v.transpose(0, 1)
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def commit(self, start: int, path: Tensor) -> None:
        """Move the entries of the accepted tree nodes `path` ([A] node indices, relative to `start`,
        in order) to slots [start, start + A). A path that is already a prefix needs no copy."""
        n = path.shape[0]
        if torch.equal(path, torch.arange(n, device=path.device)):
            return
        src = path.to(self.k.device) + start
        self.k[:, :, start:start + n] = self.k[:, :, src]
        self.v[:, :, start:start + n] = self.v[:, :, src]

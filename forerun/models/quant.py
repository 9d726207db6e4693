"""Block quantization as GGUF stores it: groups of 32 inputs with a scale (and offset).

q4: W = d * q + m, q in [0, 16)      (llama.cpp Q4_1; Q4_0 is the case m = -8 d; Q4_K's sub-blocks)
q8: W = d * q (+ m), q in [-128, 127] (llama.cpp Q8_0; Q5_K's 5-bit codes with offsets; Q6_K's
    6-bit codes with a scale per 16 inputs)

Scales and offsets are float16 where GGUF stores them so, and float32 where it stores them as a
product (the K-quants' super-block scale times a 6- or 8-bit sub-block scale, exact in float32), so
weights read from a GGUF's blocks (from_gguf) are exactly the file's.

Re-quantizing a tensor that was dequantized from Q4_0/Q4_1/Q8_0 recovers its blocks exactly: each
block's extremes sit on the extreme codes, so min/max (or max |w|) give back d and m, which are
float16 numbers already. For float checkpoints this is ordinary lossy round-to-nearest quantization.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K
from torch import Tensor

from forerun.kernels import cpu_kernels

GROUP = 32


@dataclass
class QuantWeight:
    kind: str  # "q4" or "q8"
    codes: Tensor  # q4: [N, K / 2] uint8, two codes a byte (q[j] low nibble, q[j + 16] high); q8: [N, K] int8
    scales: Tensor  # [N, K / 32], or [N, K / 16] (q8 only: a scale per 16 inputs); float16 or float32
    mins: Tensor | None  # [N, K / 32], the scales' dtype (always for q4, optional for q8)
    native: object = field(default=None, repr=False)  # the kernels' repacked copy (packed_q4, packed_q8)

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return (n, k * 2) if self.kind == "q4" else (n, k)

    @property
    def per16(self) -> bool:
        """A scale per 16 inputs (two per block of 32) rather than one per 32."""
        return self.scales.shape[1] * 16 == self.shape[1]


def quantizable(weight: Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[1] % GROUP == 0 and weight.device.type == "cpu"


def quantize_q4(weight: Tensor) -> QuantWeight:
    n, k = weight.shape
    groups = weight.float().view(n, k // GROUP, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).half()
    mins = lo.half()
    safe = scale.float().clamp(min=torch.finfo(torch.float16).tiny)
    q = ((groups - mins.float()[..., None]) / safe[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return QuantWeight("q4", _pack_nibbles(q), scale, mins)


def quantize_q8(weight: Tensor) -> QuantWeight:
    n, k = weight.shape
    groups = weight.float().view(n, k // GROUP, GROUP)
    scale = (groups.abs().amax(-1) / 127).half()
    safe = scale.float().clamp(min=torch.finfo(torch.float16).tiny)
    q = (groups / safe[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return QuantWeight("q8", q.reshape(n, k).contiguous(), scale, None)


QUANTIZERS = {"q4": quantize_q4, "q8": quantize_q8}


def _pack_nibbles(q: Tensor) -> Tensor:
    """[N, G, 32] codes in [0, 16) -> [N, G * 16] bytes, byte j of a block holding q[j] and q[j + 16]."""
    return (q[..., :16] | (q[..., 16:] << 4)).reshape(q.shape[0], -1).contiguous()


def _codes(w: QuantWeight) -> Tensor:
    """[N, K] int8 codes."""
    if w.kind == "q8":
        return w.codes
    n, k = w.shape
    packed = w.codes.view(n, k // GROUP, GROUP // 2)
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1).view(n, k).to(torch.int8)


def dequantize(w: QuantWeight) -> Tensor:
    """The float32 weight [N, K] the quantized blocks stand for."""
    n, k = w.shape
    out = _codes(w).float() * w.scales.float().repeat_interleave(k // w.scales.shape[1], dim=1)
    return out if w.mins is None else out + w.mins.float().repeat_interleave(GROUP, dim=1)


def concat(parts: list[QuantWeight]) -> QuantWeight:
    """The row blocks of a fused projection (q, k, v; gate, up) as one weight. Parts stored differently
    meet in the widest format, exactly: 4-bit codes as int8 ones, a scale per 32 inputs as two equal
    ones per 16, float16 as float32, missing offsets as zeros."""
    kind = "q8" if any(p.kind == "q8" for p in parts) else "q4"
    per16 = any(p.per16 for p in parts)
    dtype = torch.float32 if any(p.scales.dtype == torch.float32 for p in parts) else torch.float16
    mins = any(p.mins is not None for p in parts)
    parts = [_as_format(p, kind, per16, dtype, mins) for p in parts]
    return QuantWeight(kind, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                       torch.cat([p.mins for p in parts]) if mins else None)


def _as_format(w: QuantWeight, kind: str, per16: bool, dtype: torch.dtype, mins: bool) -> QuantWeight:
    codes = _codes(w) if kind != w.kind else w.codes
    scales = w.scales.repeat_interleave(2, dim=1) if per16 and not w.per16 else w.scales
    offsets = w.mins
    if offsets is None and mins:
        offsets = torch.zeros(w.shape[0], w.shape[1] // GROUP)
    return QuantWeight(kind, codes, scales.to(dtype), None if offsets is None else offsets.to(dtype))


def take_rows(w: QuantWeight, rows: np.ndarray) -> QuantWeight:
    """The weight with its output rows reordered (blocks run along a row, so rows move whole)."""
    index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    pick = None if w.mins is None else w.mins[index]
    return replace(w, codes=w.codes[index], scales=w.scales[index], mins=pick, native=None)


def packed_q4(w: QuantWeight):
    """The native kernels' layout of a q4 weight, made once and kept on it: blocks of 16 output columns
    (the last padded), each group of 32 inputs as 4 chunks of (16 columns x 4 bytes), a byte holding
    input i in its low nibble and i + 16 in its high one (GGUF's pairing), then the block's scales and
    mins. See PackedQ4 in kernels/cpu.cpp."""
    if w.native is None:
        n, k = w.shape
        codes = _column_blocks(w.codes.view(n, k // GROUP, 4, 4), 3)  # [block, G, j, c, b]
        w.native = cpu_kernels().pack_q4(codes, _column_blocks(w.scales), _column_blocks(w.mins), n, k)
    return w.native


def packed_q8(w: QuantWeight):
    """The native kernels' layout of a q8 weight (see PackedQ8 in kernels/cpu.cpp), made once: blocks of
    16 output columns, each group of 32 inputs as 8 chunks of (16 columns x 4 bytes), then the
    block's scales (one or two per group), the sums of the codes under each scale, and the offsets."""
    if w.native is None:
        n, k = w.shape
        s = 2 if w.per16 else 1
        sums = w.codes.view(n, k // GROUP, s, GROUP // s).sum(-1, dtype=torch.int32)  # [N, G, S]
        codes = _column_blocks(w.codes.view(n, k // GROUP, 8, 4), 3)  # [block, G, j, c, b]
        scales = _column_blocks(w.scales.view(n, k // GROUP, s))
        mins = None if w.mins is None else _column_blocks(w.mins)
        w.native = cpu_kernels().pack_q8(codes, scales, _column_blocks(sums), mins, n, k)
    return w.native


def _column_blocks(t: Tensor, column_dim: int = -1) -> Tensor:
    """[N, G, ...] per output row -> [N16 / 16, G, ...] with the 16 rows of each block of output columns
    moved to `column_dim` (the rows padded with zeros to a multiple of 16)."""
    n = t.shape[0]
    blocks = -(-n // 16)
    t = F.pad(t, (0, 0) * (t.dim() - 1) + (0, blocks * 16 - n))
    return t.view(blocks, 16, *t.shape[1:]).movedim(1, column_dim).contiguous()


def linear(x: Tensor, w: QuantWeight) -> Tensor:
    """x [..., K] float32 -> [..., N] float32, on the native kernel when it is available. The q4
    kernel rounds x to 8 bits per block of 32 (llama.cpp's Q8_1; block sums stay exact). Every row is
    computed alone, whatever the number of rows: prompt chunks and decoding steps of any batch give a
    row the same result, which exact batching and recomputation after preemption rely on."""
    kernels = cpu_kernels()
    if kernels is None:
        return F.linear(x, dequantize(w))
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if w.kind == "q4":
        y = kernels.q4_linear(rows, packed_q4(w))
    else:
        y = kernels.q8_linear(rows, packed_q8(w))
    return y.view(*x.shape[:-1], y.shape[-1])


# -- GGUF blocks ------------------------------------------------------------------------------------
# Each reader takes a tensor's raw blocks, [N, blocks a row, bytes a block] uint8, as the file stores
# them (ggml-common.h) and returns the same weights in the kernels' formats, no value changed.


def _u8(raw: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(raw))  # a copy: the reader's array maps the file read-only


def _f16(raw: np.ndarray) -> Tensor:
    return _u8(raw).view(torch.float16)[..., 0]


def _flat(n: int, t: Tensor) -> Tensor:
    return t.reshape(n, -1).contiguous()


def _q4_0(b: np.ndarray) -> QuantWeight:  # d, 16 bytes of nibbles; w = d * (q - 8)
    d = _f16(b[..., 0:2])
    return QuantWeight("q4", _flat(len(b), _u8(b[..., 2:])), d, -8 * d)  # -8 d: exact in float16


def _q4_1(b: np.ndarray) -> QuantWeight:  # d, m, 16 bytes of nibbles; w = d * q + m
    return QuantWeight("q4", _flat(len(b), _u8(b[..., 4:])), _f16(b[..., 0:2]), _f16(b[..., 2:4]))


def _q8_0(b: np.ndarray) -> QuantWeight:  # d, 32 int8 codes; w = d * q
    return QuantWeight("q8", _flat(len(b), _u8(b[..., 2:]).view(torch.int8)), _f16(b[..., 0:2]), None)


def _k_scales(b: np.ndarray) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K super-blocks (d, dmin, 12 bytes of 6-bit sc and m for 8 sub-blocks of 32): each
    sub-block's scale d * sc and offset -dmin * m, float32 products of a float16 and a 6-bit integer
    (exact), [N, super-blocks * 8]."""
    n = len(b)
    sc, m = Q4_K.get_scale_min(np.array(b[..., 4:16]).reshape(-1, 12))
    d, dmin = _f16(b[..., 0:2]).float()[..., None], _f16(b[..., 2:4]).float()[..., None]
    sc, m = (_u8(t).view(*b.shape[:2], 8).float() for t in (sc, m))
    return _flat(n, d * sc), _flat(n, -(dmin * m))


def _k_low_nibbles(qs: np.ndarray) -> Tensor:
    """K-quant 4-bit codes: 32-byte runs, sub-block 2i in the low nibbles of run i, 2i + 1 in the high
    ones -> [N, super-blocks, 8 sub-blocks, 32] uint8."""
    runs = _u8(qs).view(*qs.shape[:2], -1, 1, 32)
    return torch.cat([runs & 0x0F, runs >> 4], dim=3).view(*qs.shape[:2], -1, 32)


def _q4_k(b: np.ndarray) -> QuantWeight:  # d, dmin, scales, 128 bytes of nibbles
    scales, mins = _k_scales(b)
    q = _k_low_nibbles(b[..., 16:144]).view(len(b), -1, GROUP)
    return QuantWeight("q4", _pack_nibbles(q), scales, mins)


def _q5_k(b: np.ndarray) -> QuantWeight:  # d, dmin, scales, 32 bytes of fifth bits, 128 of nibbles
    scales, mins = _k_scales(b)
    high = _u8(b[..., 16:48]).view(*b.shape[:2], 1, 32) >> torch.arange(8, dtype=torch.uint8)[:, None]
    q = _k_low_nibbles(b[..., 48:176]) | ((high & 1) << 4)  # bit i of byte j: sub-block i, input j
    return QuantWeight("q8", _flat(len(b), q.to(torch.int8)), scales, mins)


def _q6_k(b: np.ndarray) -> QuantWeight:  # 128 bytes of low nibbles, 64 of high pairs, 16 int8 scales, d
    n, blocks = b.shape[:2]
    low = _u8(b[..., 0:128]).view(n, blocks, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8)[:, None]
    high = _u8(b[..., 128:192]).view(n, blocks, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]
    q = (low & 0x0F).view(n, blocks, 2, 4, 32) | ((high & 3) << 4)  # 128-input halves, 4 runs of 32 each
    sc = _u8(b[..., 192:208]).view(torch.int8).float()
    scales = _f16(b[..., 208:210]).float()[..., None] * sc  # d * sc: float16 times int8, exact in float32
    return QuantWeight("q8", _flat(n, q.to(torch.int8) - 32), _flat(n, scales), None)


GGUF_READERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def from_gguf(raw: np.ndarray, type_name: str, n: int, k: int) -> QuantWeight:
    """A GGUF tensor's raw blocks ([N, bytes a row] uint8, as gguf.GGUFReader gives them) of one of the
    GGUF_READERS types, as a weight [N, K] the kernels run exactly as stored."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return GGUF_READERS[type_name](np.asarray(raw).reshape(n, k // block, size))

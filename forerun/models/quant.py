"""Block quantization as GGUF stores it: groups of 32 inputs with a float16 scale (and offset).

q4: W = d * q + m, q in [0, 16)   (llama.cpp Q4_1; Q4_0 is the case m = -8 d)
q8: W = d * q,     q in [-127, 127] (llama.cpp Q8_0)

Re-quantizing a tensor that was dequantized from Q4_0/Q4_1/Q8_0 recovers its blocks exactly: each
block's extremes sit on the extreme codes, so min/max (or max |w|) give back d and m, which are
float16 numbers already. For float checkpoints this is ordinary lossy round-to-nearest quantization.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from forerun.kernels import cpu_kernels

GROUP = 32


@dataclass
class QuantWeight:
    kind: str  # "q4" or "q8"
    codes: Tensor  # q4: [N, K / 2] uint8, two codes a byte; q8: [N, K] int8
    scales: Tensor  # [N, K / 32] float16
    mins: Tensor | None  # [N, K / 32] float16 (q4 only)
    native: object = field(default=None, repr=False)  # the kernels' repacked copy (packed_q4, packed_q8)

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return (n, k * 2) if self.kind == "q4" else (n, k)


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
    codes = q[..., :16] | (q[..., 16:] << 4)  # byte j: q[j] low nibble, q[j + 16] high nibble
    return QuantWeight("q4", codes.reshape(n, k // 2).contiguous(), scale, mins)


def quantize_q8(weight: Tensor) -> QuantWeight:
    n, k = weight.shape
    groups = weight.float().view(n, k // GROUP, GROUP)
    scale = (groups.abs().amax(-1) / 127).half()
    safe = scale.float().clamp(min=torch.finfo(torch.float16).tiny)
    q = (groups / safe[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return QuantWeight("q8", q.reshape(n, k).contiguous(), scale, None)


QUANTIZERS = {"q4": quantize_q4, "q8": quantize_q8}


def dequantize(w: QuantWeight) -> Tensor:
    """The float32 weight [N, K] the quantized blocks stand for."""
    n, k = w.shape
    if w.kind == "q4":
        packed = w.codes.view(n, k // GROUP, GROUP // 2)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
        return (q * w.scales.float()[..., None] + w.mins.float()[..., None]).view(n, k)
    q = w.codes.view(n, k // GROUP, GROUP).float()
    return (q * w.scales.float()[..., None]).view(n, k)


def packed_q4(w: QuantWeight):
    """The native kernels' layout of a q4 weight, made once and kept on it: blocks of 16 output columns
    (the last padded), each group of 32 inputs as 4 chunks of (16 columns x 4 bytes), a byte holding
    input i in its low nibble and i + 16 in its high one (GGUF's pairing), then the block's scales and
    mins. See PackedQ4 in kernels/cpu.cpp."""
    if w.native is None:
        n, k = w.shape
        blocks, groups = -(-n // 16), k // GROUP
        pad = blocks * 16 - n
        codes = F.pad(w.codes.view(n, groups, 4, 4), (0, 0, 0, 0, 0, 0, 0, pad))  # [N16, G, j, b]
        codes = codes.view(blocks, 16, groups, 4, 4).permute(0, 2, 3, 1, 4).contiguous()  # [block, G, j, c, b]
        scales, mins = (F.pad(t, (0, 0, 0, pad)).view(blocks, 16, groups).transpose(1, 2).contiguous()
                        for t in (w.scales, w.mins))
        w.native = cpu_kernels().pack_q4(codes, scales, mins, n, k)
    return w.native


def packed_q8(w: QuantWeight):
    """The native kernels' layout of a q8 weight (see PackedQ8 in kernels/cpu.cpp), made once: blocks of
    16 output columns, each group of 32 inputs as 8 chunks of (16 columns x 4 bytes), then the
    block's scales and the sums of its codes."""
    if w.native is None:
        n, k = w.shape
        blocks, groups = -(-n // 16), k // GROUP
        pad = blocks * 16 - n
        codes = F.pad(w.codes.view(n, groups, 8, 4), (0, 0, 0, 0, 0, 0, 0, pad))  # [N16, G, j, b]
        sums = codes.sum(dim=(2, 3), dtype=torch.int32)  # [N16, G]
        codes = codes.view(blocks, 16, groups, 8, 4).permute(0, 2, 3, 1, 4).contiguous()  # [block, G, j, c, b]
        scales, sums = (t.view(blocks, 16, groups).transpose(1, 2).contiguous()
                        for t in (F.pad(w.scales, (0, 0, 0, pad)), sums))
        w.native = cpu_kernels().pack_q8(codes, scales, sums, n, k)
    return w.native


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

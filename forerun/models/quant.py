"""Block quantization as GGUF stores it: groups of 32 inputs with a float16 scale (and offset).

q4: W = d * q + m, q in [0, 16)   (llama.cpp Q4_1; Q4_0 is the case m = -8 d)
q8: W = d * q,     q in [-127, 127] (llama.cpp Q8_0)

Re-quantizing a tensor that was dequantized from Q4_0/Q4_1/Q8_0 recovers its blocks exactly: each
block's extremes sit on the extreme codes, so min/max (or max |w|) give back d and m, which are
float16 numbers already. For float checkpoints this is ordinary lossy round-to-nearest quantization.
"""
from __future__ import annotations

from dataclasses import dataclass

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
        y = kernels.q4_linear(rows, w.codes, w.scales, w.mins)
    else:
        y = kernels.q8_linear(rows, w.codes, w.scales)
    return y.view(*x.shape[:-1], y.shape[-1])

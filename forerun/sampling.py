"""Logits processing. The distribution it returns is the one speculative sampling preserves."""
from __future__ import annotations

import torch
from torch import Tensor

from forerun.config import SamplingParams


def target_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """[..., V] logits -> [..., V] probabilities after temperature, top-k and top-p (float32)."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = _top_p(logits, params.top_p)
    return torch.softmax(logits, dim=-1)


def _top_p(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # mass before this token
    drop_sorted[..., 0] = False  # rounding can leave the top token a little mass before it
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(probs: Tensor, generator: torch.Generator | None) -> int:
    """One token from probs, drawn with the sequence's generator (a CPU one, also for CUDA models)."""
    return int(torch.multinomial(_on(probs, generator), 1, generator=generator).item())


def _on(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    return probs if generator is None else probs.to(generator.device)


def gumbel_top_k(probs: Tensor, k: int, generator: torch.Generator | None) -> list[int]:
    """k distinct tokens drawn without replacement from probs, in draw order (Gumbel-top-k trick)."""
    probs = _on(probs, generator)
    u = torch.rand(probs.shape, generator=generator, device=probs.device).clamp_(1e-20, 1.0)
    keys = probs.log() - (-u.log()).log()
    k = min(k, int((probs > 0).sum()))
    return torch.topk(keys, k).indices.tolist()


def draw(logits: Tensor, params: SamplingParams,
         generator: torch.Generator | None) -> tuple[int, Tensor | None]:
    """A drafter's choice from [V] logits: (token, the distribution it came from, None if argmax)."""
    if params.greedy:
        return int(logits.argmax()), None
    probs = target_probs(logits, params)
    return sample(probs, generator), probs

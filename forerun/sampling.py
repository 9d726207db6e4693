"""Logits processing. The distribution it returns is the one speculative sampling preserves."""
from __future__ import annotations

import torch
from torch import Tensor

from forerun.config import SamplingParams


def target_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """[..., V] logits -> [..., V] probabilities after temperature, min-p, top-k and top-p (float32), in
    vLLM's order."""
    logits = logits.float() / params.temperature
    if params.min_p > 0:
        logits = _min_p(logits, params.min_p)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = _top_p(logits, params.top_p)
    return torch.softmax(logits, dim=-1)


def _min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop the tokens whose probability is below min_p times the most likely token's: compared as
    logits, log p(x) < log min_p + max log p, so no softmax is needed."""
    cut = logits.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(min_p))
    return logits.masked_fill(logits < cut, float("-inf"))


TOP_P_PREFIX = 256  # most likely tokens sorted first; top-p rarely needs more


def _top_p(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one).
    Only the most likely tokens are sorted, as many as the cut needs: a token outside the first k
    has at least the k-th token's mass before it, so once that reaches top_p the rest are dropped."""
    probs = torch.softmax(logits, dim=-1)
    vocab, k = logits.shape[-1], min(TOP_P_PREFIX, logits.shape[-1])
    while True:
        values, order = torch.topk(probs, k, dim=-1)  # sorted, most likely first
        before = values.cumsum(dim=-1) - values  # the mass before each of them
        if k == vocab or bool((before[..., -1] >= top_p).all()):
            break
        k = min(8 * k, vocab)
    keep = before < top_p
    keep[..., 0] = True  # the most likely token, even for a top_p too small to compare (5e-324 is 0 in float32)
    kept = torch.where(keep, logits.gather(-1, order), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, kept)


def sample(probs: Tensor, generator: torch.Generator | None) -> int:
    """One token from probs, drawn with the sequence's generator (a CPU one, also for CUDA models):
    the first token whose cumulative mass exceeds a uniform draw (torch.multinomial costs about a
    millisecond on a 50k vocabulary; this, a cumulative sum)."""
    probs = _on(probs, generator)
    cum = probs.double().cumsum(dim=-1)
    u = torch.rand((), generator=generator, dtype=torch.float64, device=probs.device) * cum[-1]
    token = int(torch.searchsorted(cum, u, right=True))
    if token == cum.shape[0]:  # u rounded up to the total: the last token with any mass
        token = int(torch.nonzero(probs).max())
    return token


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

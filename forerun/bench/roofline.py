"""Physical limits: the memory-bandwidth bound on AR decoding, and the idealized runtime of
Narayanan et al. 2023 ("Cheaply Evaluating Inference Efficiency Metrics for Autoregressive Transformer
APIs").

Bandwidth bound. An AR step at batch size 1 reads every weight once, so
    tokens/s <= bandwidth / weight bytes per step.
KV-cache reads and activations are left out, which makes this an upper bound. A speculative method can
exceed it: one weight pass yields tau tokens.

Idealized runtime. The paper profiles a reference implementation on fixed hardware, without
contention, over a grid of prompt sizes p and output sizes o, fits runtime = a_p + b_p * (o - 1) for
each p, and then estimates any query as
    idealized(p, o) = prompt_s(p') * p / p' + per_output_token_s * (o - 1),
with p' the smallest profiled size >= p (scaled up from the largest when p exceeds the grid).
Here the reference is the baseline contender (`ar`) on this machine, profiled before the run with the
minimum of repeated timings to strip contention. Dividing it by a contender's measured runtime gives
its speedup over an uncontended AR run of the same queries: the per-prompt noise of the baseline's own
timings drops out, and the fit's residuals are reported so that its quality can be judged.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from forerun.config import SamplingParams

GB = 1e9


def measure_bandwidth(device: str = "cpu", megabytes: int = 512, repeats: int = 7) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` full reductions over a buffer far larger than
    the caches (a streaming read, the access pattern of a weight pass)."""
    elements = megabytes * 1024 * 1024 // 4
    x = torch.ones(elements, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


def ar_bound(bandwidth: float, weight_bytes: int) -> float:
    """Upper bound on AR tokens/s when every step streams `weight_bytes` at `bandwidth` bytes/s."""
    return bandwidth / weight_bytes


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True, slots=True)
class IdealizedRuntime:
    reference: str  # the contender profiled
    per_output_token_s: float
    prompt_s: dict[int, float]  # profiled prompt size -> prompt encoding time (the fit's intercept)
    max_relative_residual: float  # worst |fit - measured| / measured over the profiling grid

    def __call__(self, prompt_tokens: int, new_tokens: int) -> float:
        sizes = sorted(self.prompt_s)
        p = next((s for s in sizes if prompt_tokens <= s), sizes[-1])
        encode = self.prompt_s[p] * prompt_tokens / p
        return encode + self.per_output_token_s * max(new_tokens - 1, 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompt_s"] = {str(k): v for k, v in self.prompt_s.items()}
        return d


def profile_idealized(contender, filler_ids: list[int], prompt_sizes: list[int], output_sizes=(1, 9, 33),
                      repeats: int = 2) -> IdealizedRuntime:
    """Time `contender` end to end over the (prompt size, output size) grid, EOS ignored, taking the
    minimum over `repeats`, and fit the cost model. `filler_ids` supplies prompt tokens (cycled)."""
    timings: dict[int, list[tuple[int, float]]] = {}
    for p in prompt_sizes:
        prompt = [filler_ids[i % len(filler_ids)] for i in range(p)]
        for o in output_sizes:
            params = SamplingParams(max_new_tokens=o, ignore_eos=True)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                contender.generate(prompt, params)
                best = min(best, time.perf_counter() - start)
            timings.setdefault(p, []).append((o, best))
    fits = {p: _line([o - 1 for o, _ in pts], [t for _, t in pts]) for p, pts in timings.items()}
    per_token = max(statistics.median(slope for _, slope in fits.values()), 0.0)  # noise can tilt a fit
    model = IdealizedRuntime(contender.name, per_token, {p: max(a, 0.0) for p, (a, _) in fits.items()}, 0.0)
    residual = max(abs(model(p, o) - t) / t for p, pts in timings.items() for o, t in pts)
    return IdealizedRuntime(model.reference, model.per_output_token_s, model.prompt_s, residual)


def prompt_grid(longest_prompt: int, context: int, smallest: int = 32) -> list[int]:
    """Powers of 4 from `smallest` up to the first size covering the longest prompt (within context)."""
    sizes, p = [], smallest
    while True:
        sizes.append(min(p, context - 64))
        if p >= longest_prompt or p >= context - 64:
            return sorted(set(sizes))
        p *= 4


def _line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx else 0.0
    return my - slope * mx, slope

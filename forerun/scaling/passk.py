"""Coverage: the unbiased pass@k estimator of Chen et al. (2021)."""
from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of n samples, c of them correct, include a correct
    one. Written as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which never forms the huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def coverage(correct_counts: list[tuple[int, int]], k: int) -> float:
    """Mean pass@k over questions, each given as (n, c); questions with fewer than k samples are skipped."""
    values = [pass_at_k(n, c, k) for n, c in correct_counts if n >= k]
    if not values:
        raise ValueError(f"no question has {k} samples")
    return sum(values) / len(values)

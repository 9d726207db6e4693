"""Per-contender, per-category numbers computed from the per-prompt records.

Speedup is against the baseline contender (`ar`) on the same prompts of the same run, two ways: the
median of per-prompt ratios (robust to one odd prompt) and the ratio of totals (what a user waiting for
all the answers sees). tau is new tokens per target forward.
"""
from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

from forerun.bench.runner import Record

OVERALL = "overall"


@dataclass(frozen=True, slots=True)
class Summary:
    contender: str
    group: str  # a category, or "overall"
    prompts: int
    new_tokens: int
    wall_s: float
    tokens_per_s: float  # total new tokens / total wall time
    median_tokens_per_s: float
    speedup_median: float | None  # median over prompts of tok/s / baseline tok/s
    speedup_total: float | None  # tok/s / baseline tok/s, both over the prompts they share
    tau: float | None  # None when the contender's forwards are not observable
    target_forwards: int | None
    accept_histogram: dict[int, int] | None
    draft_s: float | None
    verify_s: float | None
    peak_mem_mb: float | None
    extra_mem_mb: float | None
    mismatches: int | None  # outputs that differ from the baseline's; None unless greedy
    fraction_of_bound: float | None = None  # tok/s / the bandwidth bound for this contender's weights
    speedup_vs_idealized_ar: float | None = None  # idealized AR runtime / measured runtime, totals

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.accept_histogram is not None:
            d["accept_histogram"] = {str(k): v for k, v in sorted(self.accept_histogram.items())}
        return d


def summarize(records: list[Record], baseline: str | None = "ar", greedy: bool = True,
              bounds: dict[str, float] | None = None,
              idealized_ar_s: Callable[[int, int], float] | None = None) -> list[Summary]:
    """Summaries for every contender, per category (in order of appearance) and overall. Without a
    baseline, speedups and mismatch counts are left out.

    bounds: contender -> upper bound on AR tok/s from memory bandwidth (roofline.py).
    idealized_ar_s: (prompt tokens, new tokens) -> idealized AR runtime in seconds (roofline.py).
    """
    contenders = list(dict.fromkeys(r.contender for r in records))
    groups = [*dict.fromkeys(r.category for r in records), OVERALL]
    base = {r.key: r for r in records if r.contender == baseline}
    out = []
    for group in groups:
        for name in contenders:
            rows = [r for r in records if r.contender == name and group in (OVERALL, r.category)]
            if rows:
                out.append(_summary(name, group, rows, base, greedy and name != baseline and bool(base),
                                    (bounds or {}).get(name), idealized_ar_s))
    return out


def _summary(name: str, group: str, rows: list[Record], base: dict, compare: bool, bound: float | None,
             idealized_ar_s: Callable[[int, int], float] | None) -> Summary:
    tokens = sum(r.new_tokens for r in rows)
    wall = sum(r.wall_s for r in rows)
    tps = tokens / wall if wall > 0 else 0.0
    paired = [(r, base[r.key]) for r in rows if r.key in base]
    return Summary(
        contender=name, group=group, prompts=len(rows), new_tokens=tokens, wall_s=wall, tokens_per_s=tps,
        median_tokens_per_s=statistics.median(r.tokens_per_s for r in rows),
        speedup_median=_median_ratio(paired), speedup_total=_total_ratio(paired),
        tau=_tau(rows), target_forwards=_sum_or_none(r.target_forwards for r in rows),
        accept_histogram=_merged_histogram(rows), draft_s=_sum_or_none(r.draft_s for r in rows),
        verify_s=_sum_or_none(r.verify_s for r in rows),
        peak_mem_mb=_max_or_none(r.peak_mem_mb for r in rows),
        extra_mem_mb=_max_or_none(r.extra_mem_mb for r in rows),
        mismatches=count_mismatches(paired) if compare else None,
        fraction_of_bound=tps / bound if bound else None,
        speedup_vs_idealized_ar=(sum(idealized_ar_s(r.prompt_tokens, r.new_tokens) for r in rows) / wall
                                 if idealized_ar_s and wall > 0 else None),
    )


def paired_speedup(records: list[Record], contender: str, reference: str,
                   category: str | None = None) -> tuple[float | None, float | None]:
    """(median of per-prompt ratios, ratio of totals) of contender's tok/s over reference's, on the
    prompts both ran (optionally one category)."""
    ref = {r.key: r for r in records if r.contender == reference and category in (None, r.category)}
    pairs = [(r, ref[r.key]) for r in records
             if r.contender == contender and r.key in ref and category in (None, r.category)]
    return _median_ratio(pairs), _total_ratio(pairs)


def mismatches_against(records: list[Record], contender: str, reference: str) -> tuple[int, int]:
    """(outputs that differ, prompts compared) between two contenders."""
    ref = {r.key: r for r in records if r.contender == reference}
    pairs = [(r, ref[r.key]) for r in records if r.contender == contender and r.key in ref]
    return count_mismatches(pairs), len(pairs)


def count_mismatches(pairs: list[tuple[Record, Record]]) -> int:
    """How many outputs differ token for token from the baseline's on the same prompt. For a lossless
    method under greedy decoding this must be 0."""
    return sum(r.token_ids != b.token_ids for r, b in pairs)


def _median_ratio(pairs: list[tuple[Record, Record]]) -> float | None:
    ratios = [r.tokens_per_s / b.tokens_per_s for r, b in pairs if b.tokens_per_s > 0 and r.new_tokens]
    return statistics.median(ratios) if ratios else None


def _total_ratio(pairs: list[tuple[Record, Record]]) -> float | None:
    if not pairs:
        return None
    mine = sum(r.new_tokens for r, _ in pairs) / max(sum(r.wall_s for r, _ in pairs), 1e-12)
    theirs = sum(b.new_tokens for _, b in pairs) / max(sum(b.wall_s for _, b in pairs), 1e-12)
    return mine / theirs if theirs > 0 else None


def _tau(rows: list[Record]) -> float | None:
    forwards = _sum_or_none(r.target_forwards for r in rows)
    return sum(r.new_tokens for r in rows) / forwards if forwards else None


def _merged_histogram(rows: list[Record]) -> dict[int, int] | None:
    if any(r.accept_histogram is None for r in rows):
        return None
    total: Counter = Counter()
    for r in rows:
        total.update(r.accept_histogram)
    return dict(sorted(total.items()))


def _sum_or_none(values) -> float | int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _max_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None

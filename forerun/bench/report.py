"""Outputs of a bench run: results.json (every per-prompt record), report.md (tables per category and
overall) and PNG plots (speedup by category, the accept-length histogram, tok/s against the roofline)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from forerun.bench.metrics import OVERALL, Summary
from forerun.bench.runner import Record
from forerun.plotting import colors, figure, legend_outside, plain_log_ticks, pyplot, save


@dataclass
class BenchResult:
    meta: dict  # command, date, machine, versions, dataset, sampling
    contenders: dict[str, dict]  # name -> Label.to_dict()
    skipped: dict[str, str]  # contender -> why it did not run, or why it was dropped mid-run
    records: list[Record]
    summaries: list[Summary]
    baseline: str = "ar"
    roofline: dict = field(default_factory=dict)  # bandwidth and per-contender bounds
    idealized: dict | None = None  # IdealizedRuntime.to_dict()

    def to_json(self) -> dict:
        return {"meta": self.meta, "baseline": self.baseline, "contenders": self.contenders,
                "skipped": self.skipped, "roofline": self.roofline, "idealized_runtime": self.idealized,
                "summary": [s.to_dict() for s in self.summaries],
                "records": self._records_json()}

    def _records_json(self) -> list[dict]:
        base = {r.key: r for r in self.records if r.contender == self.baseline}
        out = []
        for r in self.records:
            d = r.to_dict()
            b = base.get(r.key)
            d["same_as_baseline"] = None if b is None or r is b else r.token_ids == b.token_ids
            out.append(d)
        return out


def write_report(result: BenchResult, out: Path) -> list[Path]:
    """Write results.json, report.md and the plots into `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.to_json(), indent=1))
    plots = write_plots(result, out)
    (out / "report.md").write_text(markdown(result, [p.name for p in plots]))
    return [out / "results.json", out / "report.md", *plots]


# -- markdown ----------------------------------------------------------------------------------------------


def markdown(result: BenchResult, plot_names: list[str] = ()) -> str:
    m = result.meta
    lines = ["# forerun bench", "",
             f"- command: `{m.get('command', '')}`",
             f"- date: {m.get('date', '')}",
             f"- machine: {m.get('machine', '')}",
             f"- versions: {m.get('versions', '')}",
             f"- dataset: {m.get('dataset', '')} ({m.get('questions', '?')} questions, "
             f"{len({r.key for r in result.records})} turns)",
             f"- sampling: {m.get('sampling', '')}",
             f"- speedups are against `{result.baseline}` in this run; wall time is end to end (prefill "
             "included), measured the same way for every contender, interleaved per prompt; warm-up excluded",
             f"- peak memory: {m.get('memory', '')}",
             "- \"differ from baseline\": outputs not token-identical to the baseline's (greedy runs). It must be 0 "
             "for forerun's methods, which are lossless; for peers it reflects another implementation (llama.cpp "
             "computes on the quantized blocks, not their float dequantization)", ""]
    lines += _contender_table(result)
    if result.skipped:
        lines += ["Skipped or dropped (left out of every table):", ""] + [f"- `{k}`: {v}" for k, v in result.skipped.items()] + [""]
    overall = [s for s in result.summaries if s.group == OVERALL]
    lines += ["## Overall", ""] + _overall_table(overall) + [""]
    lines += _histograms(overall)
    if result.idealized:
        lines += _idealized_section(result.idealized)
    lines += ["## Per category", ""]
    for group in dict.fromkeys(s.group for s in result.summaries if s.group != OVERALL):
        lines += [f"### {group}", ""] + _category_table([s for s in result.summaries if s.group == group]) + [""]
    if plot_names:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plot_names] + [""]
    return "\n".join(lines)


def overall_markdown(result: BenchResult) -> str:
    """The overall table alone (what the CLI prints when a run ends)."""
    return "\n".join(_overall_table([s for s in result.summaries if s.group == OVERALL]))


def _contender_table(result: BenchResult) -> list[str]:
    bounds = result.roofline.get("bounds", {})
    bw = result.roofline.get("bandwidth_gb_s")
    lines = ["## Contenders", ""]
    if bw:
        lines += [f"Measured read bandwidth: {bw:.1f} GB/s ({result.roofline.get('method', '')}).", ""]
    lines += ["| contender | engine | method | weights | threads | device | weight MB/step | AR bound tok/s | options |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, label in result.contenders.items():
        extra = ", ".join(f"{k}={v}" for k, v in label.get("extra", {}).items()) or "-"
        lines.append(f"| {name} | {label['engine']} | {label['method']} | {label['dtype']} | {label['threads']} | "
                     f"{label['device']} | {_f(label['weight_bytes'] / 1e6, 1)} | {_f(bounds.get(name), 1)} | {extra} |")
    return lines + [""]


def _overall_table(rows: list[Summary]) -> list[str]:
    lines = ["| contender | tok/s | median tok/s | speedup (median) | speedup (totals) | tau | target forwards "
             "| draft s | verify s | peak MB | extra MB | of AR bound | vs idealized AR | differ from baseline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(f"| {s.contender} | {s.tokens_per_s:.1f} | {s.median_tokens_per_s:.1f} | {_x(s.speedup_median)} | "
                     f"{_x(s.speedup_total)} | {_f(s.tau)} | {_i(s.target_forwards)} | {_f(s.draft_s, 1)} | "
                     f"{_f(s.verify_s, 1)} | {_f(s.peak_mem_mb, 0)} | {_f(s.extra_mem_mb, 0)} | "
                     f"{_pct(s.fraction_of_bound)} | {_x(s.speedup_vs_idealized_ar)} | {_mismatch(s)} |")
    return lines


def _category_table(rows: list[Summary]) -> list[str]:
    lines = ["| contender | turns | tok/s | speedup (median) | speedup (totals) | tau | differ from baseline |",
             "|---|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(f"| {s.contender} | {s.prompts} | {s.tokens_per_s:.1f} | {_x(s.speedup_median)} | "
                     f"{_x(s.speedup_total)} | {_f(s.tau)} | {_mismatch(s)} |")
    return lines


def _histograms(rows: list[Summary]) -> list[str]:
    lines = ["Accept-length histogram (tokens gained per target forward: forwards):", ""]
    for s in rows:
        if s.accept_histogram is not None:
            body = ", ".join(f"{k}: {v}" for k, v in sorted(s.accept_histogram.items()))
            lines.append(f"- `{s.contender}`: {body}")
    return lines + [""]


def _idealized_section(ideal: dict) -> list[str]:
    prompt = ", ".join(f"{k} tok: {v * 1e3:.0f} ms" for k, v in ideal["prompt_s"].items())
    return ["Idealized AR runtime (Narayanan et al. 2023), profiled on `" + ideal["reference"] + "` before the "
            f"run: {ideal['per_output_token_s'] * 1e3:.1f} ms per output token; prompt encoding {prompt}; worst "
            f"fit residual {ideal['max_relative_residual']:.0%}. \"vs idealized AR\" = idealized AR runtime of "
            "the same queries / measured runtime.", ""]


def _mismatch(s: Summary) -> str:
    return "-" if s.mismatches is None else f"{s.mismatches}/{s.prompts}"


def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _i(v) -> str:
    return "-" if v is None else str(int(v))


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0%}"


# -- plots -----------------------------------------------------------------------------------------------


def write_plots(result: BenchResult, out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    paths = [_speedup_plot(plt, result, out / "speedup_by_category.png"),
             _tau_plot(plt, result, out / "tau_histogram.png"),
             _roofline_plot(plt, result, out / "roofline.png")]
    plt.close("all")
    return [p for p in paths if p is not None]


def _speedup_plot(plt, result: BenchResult, path: Path) -> Path:
    rows = [s for s in result.summaries if s.contender != result.baseline]
    groups = list(dict.fromkeys(s.group for s in rows))
    names = list(dict.fromkeys(s.contender for s in rows))
    bars = len(groups) * max(len(names), 1)
    fig, ax = figure(plt, 4.5 + 0.2 * bars, 6)  # about 0.2 inch a bar, at most MAX_INCHES wide
    width = 0.8 / max(len(names), 1)
    for i, (name, color) in enumerate(zip(names, colors(plt, len(names)))):
        values = {s.group: s.speedup_median for s in rows if s.contender == name}
        ax.bar([g + i * width for g in range(len(groups))], [values.get(g) or 0 for g in groups], width, label=name,
               color=color)
    ax.axhline(1.0, color="black", linewidth=0.8, label=f"{result.baseline} (1.0x)")
    ax.set_xticks([g + width * (len(names) - 1) / 2 for g in range(len(groups))], groups, rotation=30, ha="right")
    ax.set_xlabel("prompt category (overall: every prompt)")
    ax.set_ylabel(f"speedup over {result.baseline} (x, median of per-prompt ratios)")
    fig.suptitle(f"Speedup over {result.baseline} by category (tokens/s end to end, same prompts, one run)")
    ax.grid(axis="y", alpha=0.3)
    legend_outside(fig, ax)
    return save(plt, fig, path)


def _tau_plot(plt, result: BenchResult, path: Path) -> Path:
    rows = [s for s in result.summaries if s.group == OVERALL and s.accept_histogram]
    longest = max((max(s.accept_histogram) for s in rows), default=1)
    bars = longest * max(len(rows), 1)
    fig, ax = figure(plt, 4.5 + 0.15 * bars, 6)
    width = 0.8 / max(len(rows), 1)
    xs = range(1, longest + 1)
    for i, (s, color) in enumerate(zip(rows, colors(plt, len(rows)))):
        steps = sum(s.accept_histogram.values())
        shares = [100 * s.accept_histogram.get(x, 0) / steps for x in xs]
        label = f"{s.contender} (tau {s.tau:.2f})" if s.tau else s.contender
        if bars <= 80:
            ax.bar([x + i * width for x in xs], shares, width, label=label, color=color)
        else:  # side-by-side bars would be slivers: one line per contender reads better
            ax.plot(xs, shares, marker="o", markersize=3, label=label, color=color)
    middle = width * (len(rows) - 1) / 2 if bars <= 80 else 0
    ax.set_xticks([x + middle for x in xs], xs)
    ax.set_xlabel("tokens gained in one target forward (accepted draft tokens + 1)")
    ax.set_ylabel("share of target forwards (%)")
    fig.suptitle("Tokens gained per target forward, every prompt (tau: their mean)")
    ax.grid(axis="y", alpha=0.3)
    legend_outside(fig, ax)
    return save(plt, fig, path)


def _roofline_plot(plt, result: BenchResult, path: Path) -> Path | None:
    rows = [s for s in result.summaries if s.group == OVERALL]
    bounds = result.roofline.get("bounds", {})
    fig, ax = figure(plt, 4.5 + 0.9 * len(rows), 6)
    xs = range(len(rows))
    ax.bar(xs, [s.tokens_per_s for s in rows], 0.6, label="measured tokens/s, end to end")
    marked = [(x, bounds[s.contender]) for x, s in zip(xs, rows) if s.contender in bounds]
    if marked:
        ax.hlines([b for _, b in marked], [x - 0.35 for x, _ in marked], [x + 0.35 for x, _ in marked],
                  color="red", linewidth=2, label="AR bound: bandwidth / weight bytes", zorder=3)
    for x, s in zip(xs, rows):
        if s.fraction_of_bound is not None:
            ax.annotate(f"{s.fraction_of_bound:.0%} of bound", (x, s.tokens_per_s), ha="center", va="bottom",
                        fontsize="small")
    ax.set_xticks(list(xs), [s.contender for s in rows], rotation=30, ha="right")
    ax.set_xlabel("contender")
    if marked:
        ax.set_yscale("log")  # bounds of float32, bf16 and 4-bit weights differ several-fold
        plain_log_ticks(plt, ax)
        ax.set_ylabel("tokens/s (log scale)")
        fig.suptitle("Tokens/s of every prompt against the memory-bandwidth bound of AR decoding")
    else:
        ax.set_ylabel("tokens/s")
        fig.suptitle("Tokens/s of every prompt, end to end (no bandwidth bound measured)")
    ax.grid(axis="y", alpha=0.3)
    if marked:  # bars alone need no legend
        legend_outside(fig, ax)
    return save(plt, fig, path)

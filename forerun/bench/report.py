"""Outputs of a bench run: results.json (every per-prompt record), report.md (tables per category and
overall) and PNG plots (speedup by category, the accept-length histogram, tok/s against the roofline)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from forerun.bench.metrics import OVERALL, Summary
from forerun.bench.runner import Record
from forerun.plotting import pyplot


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
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) * max(len(names), 1) ** 0.5 + 3), 4.5))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = {s.group: s.speedup_median for s in rows if s.contender == name}
        ax.bar([g + i * width for g in range(len(groups))], [values.get(g) or 0 for g in groups], width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([g + width * (len(names) - 1) / 2 for g in range(len(groups))], groups, rotation=30, ha="right")
    ax.set_ylabel(f"speedup vs {result.baseline} (median of per-prompt ratios)")
    ax.set_title("Speedup by category")
    return _save(fig, ax, path, legend=bool(names))


def _tau_plot(plt, result: BenchResult, path: Path) -> Path:
    rows = [s for s in result.summaries if s.group == OVERALL and s.accept_histogram]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    longest = max((max(s.accept_histogram) for s in rows), default=1)
    width = 0.8 / max(len(rows), 1)
    for i, s in enumerate(rows):
        steps = sum(s.accept_histogram.values())
        xs = range(1, longest + 1)
        ax.bar([x + i * width for x in xs], [s.accept_histogram.get(x, 0) / steps for x in xs], width,
               label=f"{s.contender} (tau {s.tau:.2f})" if s.tau else s.contender)
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(1, longest + 1)], range(1, longest + 1))
    ax.set_xlabel("tokens gained per target forward")
    ax.set_ylabel("fraction of target forwards")
    ax.set_title("Accept-length histogram")
    return _save(fig, ax, path, legend=bool(rows))


def _save(fig, ax, path: Path, legend: bool) -> Path:
    if legend:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _roofline_plot(plt, result: BenchResult, path: Path) -> Path | None:
    rows = [s for s in result.summaries if s.group == OVERALL]
    bounds = result.roofline.get("bounds", {})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    ax.bar(xs, [s.tokens_per_s for s in rows], 0.6, label="measured tok/s")
    marked = [(x, bounds[s.contender]) for x, s in zip(xs, rows) if s.contender in bounds]
    if marked:
        ax.scatter([x for x, _ in marked], [b for _, b in marked], marker="_", s=900, color="red", linewidths=2,
                   label="AR bandwidth bound for its weights", zorder=3)
    for x, s in zip(xs, rows):
        if s.fraction_of_bound is not None:
            ax.annotate(f"{s.fraction_of_bound:.0%}", (x, s.tokens_per_s), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [s.contender for s in rows], rotation=30, ha="right")
    ax.set_yscale("log")  # bounds of float32, bf16 and 4-bit weights differ several-fold
    ax.set_ylabel("tokens/s (log scale; labels: fraction of the bound)")
    ax.set_title("Tokens/s against the memory-bandwidth roofline")
    return _save(fig, ax, path, legend=True)

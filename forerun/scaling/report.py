"""results.json, report.md and plots for `forerun scale`."""
from __future__ import annotations

import json
from pathlib import Path

from forerun.plotting import pyplot


def write_results(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json"]
    paths[0].write_text(json.dumps(results, indent=1))
    plots = write_plots(results, out)
    report = out / "report.md"
    report.write_text(markdown(results, [p.name for p in plots]))
    return paths + [report] + plots


def markdown(results: dict, plots: list[str] = ()) -> str:
    s = results.get("settings", {})
    lines = [f"# forerun scale: {results['task']}, {results['problems']} problems", ""]
    if s:
        lines += [f"model `{s.get('model')}`, temperature {s.get('temperature')}, scorer `{s.get('reward')}`, "
                  f"seed {s.get('seed')}", ""]
    if results.get("command"):
        lines += ["```", results["command"], "```", ""]
    lines += ["| strategy | n | accuracy | generated tok / q | prefill tok / q | target forwards / q | "
              "engine steps / q | score forwards / q | samples kept / q | elapsed s / q |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    count = results["problems"]
    for r in results["runs"]:
        lines.append(f"| {r['strategy']} | {r['budget']} | {r['accuracy']:.3f} | "
                     f"{r['generated_tokens'] / count:.1f} | {r['prefill_tokens'] / count:.1f} | "
                     f"{r['target_forwards'] / count:.1f} | {r['engine_steps'] / count:.1f} | "
                     f"{r['score_forwards'] / count:.1f} | {r.get('replayed', 0) / count:.1f} | "
                     f"{r.get('elapsed_s', r['wall_s']) / count:.2f} |")
    cov = results.get("coverage")
    if cov:
        shown = [k for k in cov["k"] if k in (1, 2, 4, 8, 16, 32, 64) or k == cov["n"]]
        lines += ["", f"Coverage from the {cov['n']} samples per question of `{cov['from']}` (unbiased pass@k):", "",
                  "| k | " + " | ".join(map(str, shown)) + " |", "|---|" + "---:|" * len(shown),
                  "| pass@k | " + " | ".join(f"{cov['pass_at_k'][k - 1]:.3f}" for k in shown) + " |"]
    lines += [""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def write_plots(results: dict, out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    paths = [_accuracy_plot(plt, results, out / "accuracy_vs_tokens.png")]
    if results.get("coverage"):
        paths.append(_coverage_plot(plt, results["coverage"], out / "coverage.png"))
    return paths


def _accuracy_plot(plt, results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    by_strategy: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by_strategy.setdefault(r["strategy"], []).append(r)
    for name, rows in by_strategy.items():
        rows = sorted(rows, key=lambda r: r["budget"])
        ax.plot([r["generated_tokens_per_question"] for r in rows], [r["accuracy"] for r in rows], marker="o",
                label=name)
        for r in rows:
            ax.annotate(str(r["budget"]), (r["generated_tokens_per_question"], r["accuracy"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_ylim(*_accuracy_range([r["accuracy"] for r in results["runs"]]))
    ax.set_xlabel("generated tokens per question")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{results['task']}: accuracy against tokens (labels: budget n)")
    return _save(fig, ax, path)


def _coverage_plot(plt, cov: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(cov["k"], cov["pass_at_k"], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_ylim(*_accuracy_range(cov["pass_at_k"]))
    ax.set_xlabel("k samples")
    ax.set_ylabel("coverage (pass@k)")
    ax.set_title(f"coverage from {cov['n']} samples per question")
    return _save(fig, ax, path)


def _accuracy_range(values: list[float]) -> tuple[float, float]:
    """The whole 0-1 scale, unless every value is below 0.4: then up to a little above the largest,
    so a small model's few percent are not a flat line at the bottom."""
    top = max(values, default=1.0)
    return (-0.02, 1.02) if top >= 0.4 else (-0.005, max(0.05, round(top * 1.25, 2)))


def _save(fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path

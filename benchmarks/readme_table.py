"""Regenerate the bench table in README.md from a `forerun bench` run.

Runs the bench (the README's headline command by default) or reads an existing results.json, and
replaces the text between the README markers

    <!-- bench-table:start -->
    <!-- bench-table:end -->

with the overall table, the command, the machine and the date.

    python benchmarks/readme_table.py                      # run the bench, then update README.md
    python benchmarks/readme_table.py --results bench-out/results.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
ACCEPTANCE = ["bench", "--dataset", str(REPO.parent / "shared" / "data" / "spec_bench" / "question.jsonl"),
              "--limit-per-category", "5", "--methods", "ar,pld,layer-skip", "--engine-arg", "quant=q4",
              "--peers", "hf,hf-pld,llama.cpp,llama.cpp-pld", "--max-new-tokens", "32", "--out", "bench-out"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, help="an existing results.json (default: run the bench first)")
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    args, bench_args = p.parse_known_args(argv)
    results = args.results
    if results is None:
        from forerun.bench.cli import main as bench_main

        command = ["bench", *bench_args[1:]] if bench_args[:1] == ["bench"] else ACCEPTANCE
        if bench_main(command) != 0:
            return 1
        results = Path(command[command.index("--out") + 1] if "--out" in command else "bench-out") / "results.json"
    table = readme_table(json.loads(results.read_text()))
    readme = args.readme.read_text()
    if START not in readme or END not in readme:
        print(f"{args.readme} has no {START} ... {END} markers; the table is:\n\n{table}", file=sys.stderr)
        return 1
    head, rest = readme.split(START, 1)
    tail = rest.split(END, 1)[1]
    args.readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    print(f"updated {args.readme}")
    return 0


def readme_table(data: dict) -> str:
    meta = data["meta"]
    rows = [s for s in data["summary"] if s["group"] == "overall"]
    labels = data["contenders"]
    lines = [f"`forerun {meta['command'].split('forerun ', 1)[-1]}`", "",
             f"{meta['date'][:10]}, {meta['machine']}; {meta['versions']}; {meta['dataset']} "
             f"({meta['questions']} questions), {meta['sampling']}. Wall time end to end, interleaved per prompt.",
             "", "| contender | weights | tok/s | speedup vs ar (median / totals) | tau | differ from ar |",
             "|---|---|---|---|---|---|"]
    for s in rows:
        label = labels[s["contender"]]
        speedup = "-" if s["speedup_median"] is None else f"{s['speedup_median']:.2f}x / {s['speedup_total']:.2f}x"
        tau = "-" if s["tau"] is None else f"{s['tau']:.2f}"
        differ = "-" if s["mismatches"] is None else f"{s['mismatches']}/{s['prompts']}"
        lines.append(f"| {s['contender']} ({label['engine'].split(' (')[0]}) | {label['dtype']} | "
                     f"{s['tokens_per_s']:.1f} | {speedup} | {tau} | {differ} |")
    skipped = data.get("skipped") or {}
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

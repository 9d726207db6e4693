"""Teacher-forced acceptance of EAGLE-3 heads on recorded replies, by the kind of prompt.

Reads the shards `forerun train-head` records (the target's own replies with its features) and, for each
head, the share of positions where the first draft equals the target's choice, and where drafts 1..2 and
1..3 all do (what a greedy chain of that length accepts), per prompt source (instruct: the instruction
mix's templates together; gsm8k, code, generated, translate, summarize, rag). `--heldout` limits it to
the replies a training run held back (its OUT/heldout.json), so a head trained on that data is measured
on replies it never saw.

    python benchmarks/head_acceptance.py --data runs/head5/data --heldout runs/head5/heldout.json \\
        --heads shipped,runs/head5/head
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from forerun import LLM
from forerun.drafters.eagle import shipped_head
from forerun.heads.data import load_shards
from forerun.heads.eagle3 import load_head
from forerun.heads.train import TrainConfig, evaluate, examples, target_rows
from forerun.bench.harness import machine_description

KINDS = ("gsm8k", "code", "generated", "translate", "summarize", "rag")  # and the instruction mix's templates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a folder of recorded shards (train-head's OUT/data)")
    p.add_argument("--heldout", help="a JSON list of the reply ids to measure on (train-head's OUT/heldout.json)")
    p.add_argument("--heads", default="shipped", help="comma-separated head folders; 'shipped' is the shipped head")
    p.add_argument("--prompt-context", type=int, default=TrainConfig().prompt_context)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", help="write the table as JSON here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    llm = LLM()
    meta, records = load_shards(Path(a.data))
    wanted = set(json.loads(Path(a.heldout).read_text())) if a.heldout else None
    by_source: dict[str, list[dict]] = defaultdict(list)
    for m, r in zip(meta, records):
        if wanted is None or m["id"] in wanted:  # the instruction mix's templates together
            by_source[m["source"] if m["source"] in KINDS else "instruct"].append(r)
    by_source["all"] = [r for rows in by_source.values() for r in rows]
    config = TrainConfig(prompt_context=a.prompt_context)
    names = [h.strip() for h in a.heads.split(",") if h.strip()]
    table: dict[str, dict[str, list[float]]] = {}
    for name in names:
        head = load_head(shipped_head() if name == "shipped" else name, llm.runtime)
        rows = target_rows(llm.runtime, head.draft_ids)
        for source, recs in sorted(by_source.items()):
            table.setdefault(source, {})[name] = evaluate(head, rows, examples(recs, head.t2d, config.prompt_context),
                                                           config)
    print(f"# {machine_description()}")
    print(f"# replies: {a.data}" + (f", held back by {a.heldout}" if a.heldout else "") + "; teacher forced")
    print("| source | replies | " + " | ".join(f"{n}: first / 1-2 / 1-3" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for source in sorted(table, key=lambda s: (s == "all", s)):
        cells = [" / ".join(f"{x:.3f}" for x in table[source][n]) for n in names]
        print(f"| {source} | {len(by_source[source])} | " + " | ".join(cells) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps({"data": a.data, "heldout": a.heldout, "table": table,
                                           "replies": {s: len(r) for s, r in by_source.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()

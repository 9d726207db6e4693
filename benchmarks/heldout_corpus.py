"""A retrieval corpus disjoint from what a bench run measures: every Spec-Bench question (all turns)
that `--limit-per-category N` does not select. Add other text (GSM8K, your own documents) when
building the datastore, then pass it to the method:

    python benchmarks/heldout_corpus.py --limit-per-category 10 --out runs/heldout.jsonl
    forerun datastore build runs/heldout.jsonl ../shared/data/gsm8k/test.jsonl --out runs/ds
    forerun bench --limit-per-category 10 --methods ar,retrieval:datastore=runs/ds ...
"""
import argparse
import json
from pathlib import Path

from forerun.bench.datasets import read_jsonl, select

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default=str(DEFAULT_DATASET), help="Spec-Bench-format JSONL (default: %(default)s)")
    p.add_argument("--limit-per-category", type=int, required=True, help="as given to the bench run")
    p.add_argument("--out", required=True, help="JSONL to write, one {\"text\": ...} per question")
    a = p.parse_args()
    questions = read_jsonl(Path(a.dataset))
    measured = {id(q) for q in select(questions, None, a.limit_per_category)}
    held_out = [q for q in questions if id(q) not in measured]
    with open(a.out, "w", encoding="utf-8") as f:
        for q in held_out:
            f.write(json.dumps({"text": "\n".join(q.turns)}) + "\n")
    print(f"{a.out}: {len(held_out)} questions held out ({len(questions) - len(held_out)} measured)")


if __name__ == "__main__":
    main()

"""forerun's core speed targets, measured side by side in one process.

HF transformers `generate` (AR, prompt lookup) and forerun (ar, pld, layer-skip, in each dtype asked
for) answer the same Spec-Bench prompts, greedy, interleaved per prompt, on the same weights (the
embedded SmolLM2-135M-Instruct unless --model is given). Prints a markdown table of tokens/s and tau
per contender and category, the outputs that differ from forerun `ar` in the same dtype, and the ratios
the targets are stated in:

  1. forerun ar vs HF AR, each in its fastest dtype (target >= 3x);
  2. forerun pld vs forerun ar on summarization, same dtype (target >= 2x);
  3. forerun's best lossless contender vs HF's best lossless contender, overall (target >= 2x).

Ratios are given as the median of per-prompt ratios and as the ratio of totals.

    python benchmarks/speed_core.py --per-category 3
    python benchmarks/speed_core.py --forerun ar:float32,ar:float32:quant=q4,pld:float32:quant=q4 --hf hf:bfloat16
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch

from forerun.bench.contenders import ChatCodec, EngineCache, forerun_contenders, parse_list
from forerun.bench.datasets import Question, load_questions
from forerun.bench.harness import machine_description, versions
from forerun.bench.metrics import OVERALL, mismatches_against, paired_speedup, summarize
from forerun.bench.peers import PeerContext, build_peers
from forerun.bench.runner import Record, RunConfig, run

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
DEFAULT_FORERUN = "ar:float32,ar:bfloat16,pld:float32,pld:bfloat16,layer-skip:float32,layer-skip:bfloat16"
DEFAULT_HF = "hf:float32,hf:bfloat16,hf-pld:float32,hf-pld:bfloat16"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = first_turns(load_questions(args.dataset, parse_list(args.categories), args.per_category))
    engines = EngineCache(args.model, args.device)
    ours = forerun_contenders(parse_list(args.forerun), engines)
    codec = ChatCodec(ours[0].llm)
    ctx = PeerContext(model=args.model, device=args.device, default_dtype="float32", eos_ids=codec.eos_ids)
    peers, skipped = build_peers(parse_list(args.hf), ctx, log=lambda m: print(m, file=sys.stderr))
    contenders = ours + peers
    config = RunConfig(max_new_tokens=args.max_new_tokens, device=args.device)
    outcome = run(contenders, questions, codec, config, progress=not args.no_progress,
                  log=lambda m: print(m, file=sys.stderr))
    records, skipped = outcome.records, {**skipped, **outcome.dropped}
    contenders = [c for c in contenders if c.name not in outcome.dropped]
    labels = {c.name: c.label for c in contenders}
    print(report(records, labels, reference_ar(ours), skipped, args, questions))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(DEFAULT_DATASET), help="Spec-Bench-format JSONL (default: %(default)s)")
    p.add_argument("--categories", default="summarization,qa,writing,coding")
    p.add_argument("--per-category", type=int, default=3, help="questions per category (first turn of each)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--forerun", default=DEFAULT_FORERUN,
                   help="forerun contenders method[:dtype][:key=value...], comma-separated (default: %(default)s)")
    p.add_argument("--hf", default=DEFAULT_HF,
                   help="peer contenders (hf, hf-pld, llama.cpp, llama.cpp-pld), comma-separated (default: %(default)s)")
    p.add_argument("--model", help="HF directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def first_turns(questions: list[Question]) -> list[Question]:
    """Speed is measured on single prompts; later turns would only re-ask with a longer history."""
    return [Question(q.question_id, q.category, q.turns[:1]) for q in questions]


def reference_ar(ours) -> dict[str, str]:
    """Each forerun contender -> the `ar` contender on the same engine (same dtype and engine options)."""
    return {c.name: ar.name for c in ours for ar in ours if ar.spec.method == "ar" and ar.llm is c.llm}


def report(records: list[Record], labels: dict, ar_of: dict[str, str], skipped: dict[str, str], args,
           questions) -> str:
    overall = {s.contender: s for s in summarize(records, baseline=None) if s.group == OVERALL}
    categories = list(dict.fromkeys(r.category for r in records))
    lines = [f"# forerun speed vs HF transformers ({datetime.date.today().isoformat()})", "",
             f"- command: `python benchmarks/speed_core.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"- machine: {machine_description(args.device)}", f"- versions: {versions()}",
             f"- {len(questions)} Spec-Bench prompts ({', '.join(categories)}; first turns), greedy, "
             f"{args.max_new_tokens} new tokens, interleaved per prompt, warm-up excluded; tok/s is end to end "
             "(prefill included) and is the median over prompts unless marked 'total'", ""]
    lines += [f"- skipped `{k}`: {v}" for k, v in skipped.items()]
    head = "| contender | engine | weights | tok/s (total) | median tok/s | " + " | ".join(categories) + \
        " | tau | differ from forerun ar (same engine) |"
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in overall.items():
        by_category = [statistics.median(r.tokens_per_s for r in records if r.contender == name and r.category == c)
                       for c in categories]
        lines.append(f"| {name} | {labels[name].engine} | {labels[name].dtype} | {s.tokens_per_s:.1f} | "
                     f"{s.median_tokens_per_s:.1f} | " + " | ".join(f"{v:.1f}" for v in by_category) +
                     f" | {'-' if s.tau is None else f'{s.tau:.2f}'} | {_mismatch(records, name, ar_of)} |")
    lines += ["", "| ratio | median of per-prompt ratios | ratio of totals | target |", "|---|---|---|---|"]
    lines += [_ratio_row(records, *row) for row in target_ratios(labels, ar_of, overall)]
    return "\n".join(lines)


def target_ratios(labels: dict, ar_of: dict[str, str], overall: dict) -> list[tuple]:
    """(title, contender, reference, category, target) for each ratio the targets name."""
    def best(names):
        return max(names, key=lambda n: overall[n].tokens_per_s, default=None)

    ours = [n for n, lab in labels.items() if lab.engine == "forerun"]
    hf = [n for n, lab in labels.items() if lab.engine.startswith("transformers")]
    ours_ar = best([n for n in ours if labels[n].method == "ar"])
    hf_ar = best([n for n in hf if labels[n].method == "ar"])
    rows = []
    if ours_ar and hf_ar:
        rows.append((f"forerun ar vs HF AR, fastest dtypes (`{ours_ar}` / `{hf_ar}`)", ours_ar, hf_ar, None, "3x"))
    for n in ours:
        ar = ar_of.get(n)
        if labels[n].method == "pld" and ar:
            rows.append((f"pld vs ar on summarization (`{n}` / `{ar}`)", n, ar, "summarization", "2x"))
    best_ours, best_hf = best(ours), best(hf)
    if best_ours and best_hf:
        rows.append((f"best forerun vs best HF, overall (`{best_ours}` / `{best_hf}`)", best_ours, best_hf, None, "2x"))
    return rows


def _ratio_row(records, title, contender, reference, category, target) -> str:
    median, total = paired_speedup(records, contender, reference, category)
    return f"| {title} | {_x(median)} | {_x(total)} | >= {target} |"


def _mismatch(records: list[Record], name: str, ar_of: dict[str, str]) -> str:
    reference = ar_of.get(name)
    if reference is None or reference == name:
        return "-"
    differ, compared = mismatches_against(records, name, reference)
    return f"{differ}/{compared}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


if __name__ == "__main__":
    sys.exit(main())

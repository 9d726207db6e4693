"""Tree drafters against ar (and pld) on the embedded SmolLM2-135M, interleaved per prompt, greedy.

    python benchmarks/tree_drafters.py model-free    # ar, pld, recycle, stand
    python benchmarks/tree_drafters.py draft-trees   # ar, draft model: chain, beam, dynamic trees

One Spec-Bench question (first turn) per category; every contender runs on a prompt before the next
prompt starts, so machine noise hits all of them alike. Reports per-category speedup and tau, and the
median speedup. The draft model for `draft-trees` is the same model with 4-bit weights: the only model
at hand that shares SmolLM2's tokenizer, and one that agrees with the target almost always.
"""
import argparse
import json
import statistics

import torch

from forerun import LLM, SamplingParams, SpecConfig
from forerun.drafters.draft_model import DraftModel
from forerun.models.runtime import load

CATEGORIES = ("writing", "coding", "extraction", "translation", "summarization", "qa", "math_reasoning", "rag")
SETS = {
    "model-free": {
        "ar": SpecConfig(),
        "pld": SpecConfig(method="pld"),
        "recycle-40": SpecConfig(method="recycle"),
        "recycle-16": SpecConfig(method="recycle", options={"nodes": 16}),
        "stand-40": SpecConfig(method="stand"),
        "stand-16": SpecConfig(method="stand", options={"nodes": 16}),
    },
    "draft-trees": {
        "ar": SpecConfig(),
        "draft-chain": SpecConfig(method="draft"),
        "draft-beam-w2": SpecConfig(method="draft", tree_width=2),
        "draft-dynamic-16": SpecConfig(method="draft", options={"tree": "dynamic", "nodes": 16}),
        "draft-dynamic-32": SpecConfig(method="draft", options={"tree": "dynamic", "nodes": 32}),
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set", choices=SETS)
    parser.add_argument("--dataset", default="../shared/data/spec_bench/question.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in open(args.dataset)]
    prompts = {c: next(r for r in rows if r["category"] == c)["turns"][0] for c in CATEGORIES}
    llm, specs = LLM(), SETS[args.set]
    if args.set == "draft-trees":
        draft = load(None, dtype="bfloat16", quant="q4")
        for spec in specs.values():
            if spec.method == "draft":
                llm._drafters[spec] = DraftModel(llm.runtime, spec, draft=draft)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    results = {name: {} for name in specs}  # name -> category -> Stats
    for category, prompt in prompts.items():
        ids, reference = llm.encode(prompt), None
        for name, spec in specs.items():
            out = llm.generate_ids(ids, params, spec)
            reference = reference or out.token_ids
            assert out.token_ids == reference, f"{name} differs from ar on {category}"
            results[name][category] = s = out.stats
            print(f"{category} {name}: {s.tokens_per_s:.2f} tok/s, tau {s.mean_accepted:.2f}, "
                  f"draft {s.draft_s:.2f} s, verify {s.verify_s:.1f} s", flush=True)
    print(report(results))


def report(results: dict) -> str:
    ar = results["ar"]
    lines = ["| contender | " + " | ".join(CATEGORIES) + " | median speedup | mean tau | draft s | verify s |",
             "|---" * (len(CATEGORIES) + 5) + "|"]
    for name, per in results.items():
        ratios = [per[c].tokens_per_s / ar[c].tokens_per_s for c in CATEGORIES]
        cells = [f"{r:.2f}x / {per[c].mean_accepted:.2f}" for r, c in zip(ratios, CATEGORIES)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.median(ratios):.2f}x"
                     f" | {statistics.mean(s.mean_accepted for s in per.values()):.2f}"
                     f" | {sum(s.draft_s for s in per.values()):.1f} | {sum(s.verify_s for s in per.values()):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

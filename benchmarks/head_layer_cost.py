"""What the EAGLE-3 head's native layer (kernels eagle_layer) buys end to end: `eagle` with the layer as
one native call against the same head run op by op (the same packed weights, PyTorch ops between the
kernels), and `ar`, interleaved per prompt on Spec-Bench, greedy, 64 new tokens. Drafts are the same
up to rounding, so tau is the same; what differs is the drafting time.

    python benchmarks/head_layer_cost.py --limit-per-category 2 --threads 2
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from forerun import LLM, SamplingParams, SpecConfig
from forerun.config import EngineConfig
from forerun.bench.harness import machine_description
from forerun.drafters.eagle import Eagle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="../shared/data/spec_bench/question.jsonl")
    p.add_argument("--limit-per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    llm = LLM(engine=EngineConfig(prefix_caching=False))  # each contender computes its own prompt
    native = SpecConfig(method="eagle")
    # a second eagle drafter (its own spec: `nodes` only shapes trees, so this chain drafts the same)
    ops = SpecConfig(method="eagle", options={"nodes": 15})
    drafter = Eagle(llm.runtime, ops, head=llm.drafter(native).head.unpacked_copy())
    drafter.head.native = None
    llm.use_drafter(ops, drafter)
    assert llm.drafter(native).head.native is not None, "no native layer here: kernels missing or float weights"
    contenders = {"ar": SpecConfig(), "eagle, native layer": native, "eagle, op by op": ops}
    params = SamplingParams(temperature=0.0, max_new_tokens=a.max_new_tokens)
    seen: dict[str, int] = defaultdict(int)
    totals = {name: defaultdict(float) for name in contenders}
    differ = 0
    for line in open(a.dataset):
        row = json.loads(line)
        if seen[row["category"]] >= a.limit_per_category:
            continue
        seen[row["category"]] += 1
        ids = llm.encode(row["turns"][0])
        outputs = {}
        for name, spec in contenders.items():
            out = llm.generate_ids(ids, params, spec)
            outputs[name] = out.token_ids
            for key in ("new_tokens", "target_forwards", "draft_s", "wall_s"):
                totals[name][key] += getattr(out.stats, key)
        differ += sum(o != outputs["ar"] for o in outputs.values())
    print(f"# {machine_description()}")
    print(f"# {sum(seen.values())} Spec-Bench questions (first turns), {a.max_new_tokens} new tokens, greedy; "
          f"{differ} outputs differ from ar")
    print("| contender | tok/s | speedup | tau | draft s | draft ms / step |")
    print("|---|---|---|---|---|---|")
    base = totals["ar"]["new_tokens"] / totals["ar"]["wall_s"]
    for name, t in totals.items():
        rate = t["new_tokens"] / t["wall_s"]
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {t['new_tokens'] / t['target_forwards']:.2f} | "
              f"{t['draft_s']:.2f} | {1000 * t['draft_s'] / t['target_forwards']:.2f} |")


if __name__ == "__main__":
    main()

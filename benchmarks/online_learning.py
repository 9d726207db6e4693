"""How an EAGLE-3 head's acceptance recovers on text unlike its training data when it keeps learning
(`--learn`, forerun.heads.online), against the same head left as it is.

The shifted text: the embedded model translating short passages into another language (the shipped
head was trained on English replies only). Passages are sentences of the training prompts
(`../shared/data/train_prompts/self_instruct_mix.jsonl`), never measurement data. Rounds of distinct
prompts; within a round each prompt runs with the fixed head and then with the learning one, so the
machine's noise hits both alike. The learner trains in its background thread while requests run (on a
2-core CPU it takes time from decoding); with `--settle` it also spends the training the round's rows
bought before the next round starts (what acceptance the learner reaches when it keeps up). Greedy;
every output is checked equal to the fixed head's (learning never changes an output).

    python benchmarks/online_learning.py --threads 1 --rounds 8 --per-round 6
    python benchmarks/online_learning.py --threads 1 --rounds 8 --per-round 6 --settle
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import re
import time
from pathlib import Path

import torch

from forerun import LLM, SamplingParams, SpecConfig
from forerun.config import EngineConfig
from forerun.bench.harness import machine_description

PROMPTS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "train_prompts" / "self_instruct_mix.jsonl"


def passages(count: int, seed: int) -> list[str]:
    """`count` runs of one or two sentences (60-260 characters) from the training prompts."""
    rng = random.Random(seed)
    rows = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    rng.shuffle(rows)
    out = []
    for text in rows:
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")) if s.strip()]
        for k in range(len(sentences)):
            chunk = " ".join(sentences[k:k + 2])
            if 60 <= len(chunk) <= 260 and chunk[0].isupper() and '"' not in chunk:
                out.append(chunk)
                break
        if len(out) == count:
            return out
    raise ValueError(f"found only {len(out)} passages")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--per-round", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--language", default="French")
    p.add_argument("--lr", type=float, default=1e-4, help="the learner's learning rate")
    p.add_argument("--passes", type=float, default=4.0, help="rows of training each labelled row served buys")
    p.add_argument("--fc", action="store_true", help="the learner trains fc too")
    p.add_argument("--settle", action="store_true", help="spend the training each round bought before the next")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    # no prefix cache: the second run of a prompt would find its blocks cached, run faster, and its head
    # would never see those rows' features
    llm = LLM(engine=EngineConfig(prefix_caching=False))
    fixed = SpecConfig(method="eagle")
    learning = SpecConfig(method="eagle", options={"learn": True, "learn_lr": a.lr, "learn_passes": a.passes,
                                                       "learn_fc": a.fc})
    learner = llm.drafter(learning).learner
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=0)
    texts = passages(a.rounds * a.per_round, a.seed)
    print(f"# online learning on {a.language} translations: {machine_description()}, "
          f"lr {a.lr}, passes {a.passes}{', fc' if a.fc else ''}{', settled' if a.settle else ''}, "
          f"{datetime.date.today()}")
    print("\n| round | tau fixed | tau learning | tok/s fixed | tok/s learning | learner steps | rows trained |")
    print("|---|---|---|---|---|---|---|")
    rows, differ = [], 0
    for r in range(a.rounds):
        totals = {"fixed": [0, 0, 0.0], "learning": [0, 0, 0.0]}  # tokens, forwards, seconds
        for i, text in enumerate(texts[r * a.per_round:(r + 1) * a.per_round]):
            prompt = llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Translate the following text into {a.language}:\n\n{text}"}],
                add_generation_prompt=True)
            ids = llm.tokenizer.encode(prompt, add_bos=False)
            outs = {}
            order = (("fixed", fixed), ("learning", learning))
            for name, spec in order if i % 2 == 0 else order[::-1]:  # neither always first
                started = time.perf_counter()
                out = llm.generate_ids(ids, params, spec)
                seconds = time.perf_counter() - started
                outs[name] = out.token_ids
                t = totals[name]
                t[0] += len(out.token_ids)
                t[1] += out.stats.target_forwards
                t[2] += seconds
            differ += outs["fixed"] != outs["learning"]
        if a.settle:
            while learner.step():
                pass
            learner.publish()
        row = {"round": r + 1, "steps": learner.steps, "rows": learner.positions}
        for name, (tokens, forwards, seconds) in totals.items():
            row[f"tau_{name}"] = tokens / max(forwards, 1)
            row[f"tps_{name}"] = tokens / seconds
        rows.append(row)
        print(f"| {r + 1} | {row['tau_fixed']:.2f} | {row['tau_learning']:.2f} | {row['tps_fixed']:.1f} | "
              f"{row['tps_learning']:.1f} | {row['steps']} | {row['rows']} |", flush=True)
    learner.close()
    print(f"\noutputs different from the fixed head's: {differ}/{a.rounds * a.per_round}")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows, "differ": differ}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Side-by-side: ar, pld, retrieval, del, lookahead (and layer-skip) on one Spec-Bench prompt per category.

Greedy, the embedded SmolLM2-135M-Instruct in float32. The retrieval datastore is built from text
that is NOT among the measured prompts: every other Spec-Bench question (all turns) plus the GSM8K
test split (question + reference answer). Methods run interleaved, prompt by prompt, `--rounds`
times; per (prompt, method) the median wall time is kept. Reported: tokens/s and tau per category
and overall (total tokens / total time), and the ratio to `ar` measured in the same process.

    python benchmarks/drafters_retrieval_del_lookahead.py --max-new-tokens 96 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from forerun import LLM, SamplingParams, SpecConfig
from forerun.retrieval.datastore import build, fingerprint_of, read_documents

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CATEGORIES = ["writing", "coding", "translation", "summarization", "qa", "math_reasoning", "rag"]


def pick_prompts() -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "spec_bench" / "question.jsonl").open()]
    return [next(r for r in rows if r["category"] == c) for c in CATEGORIES]


def corpus_file(measured: list[dict], out: Path) -> Path:
    ids = {r["question_id"] for r in measured}
    lines = [json.dumps({"text": "\n".join(r["turns"])})
             for r in map(json.loads, (DATA / "spec_bench" / "question.jsonl").open()) if r["question_id"] not in ids]
    lines += [json.dumps({"text": r["question"] + "\n" + r["answer"]})
              for r in map(json.loads, (DATA / "gsm8k" / "test.jsonl").open())]
    out.write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--methods", default="ar,pld,retrieval,del,lookahead,layer-skip")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    llm = LLM()
    prompts = pick_prompts()
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    tok = llm.tokenizer
    build((tok.encode(t, add_bos=False) for t in read_documents([corpus_file(prompts, tmp / "corpus.jsonl")])),
          fingerprint_of(llm.runtime)).save(tmp / "ds")
    print(f"datastore: {time.perf_counter() - t0:.1f}s")
    specs = {m: SpecConfig(method=m, options={"datastore": str(tmp / "ds")} if m == "retrieval" else {})
             for m in a.methods.split(",")}
    params = SamplingParams(max_new_tokens=a.max_new_tokens)
    ids = [llm.encode(p["turns"][0]) for p in prompts]
    runs: dict[tuple[str, str], list] = {}
    for _ in range(a.rounds):
        for p, prompt_ids in zip(prompts, ids):
            for m, spec in specs.items():
                g = llm.generate_ids(prompt_ids, params, spec)
                runs.setdefault((p["category"], m), []).append(g)
                print(f"  {p['category']:15s} {m:11s} {g.stats.tokens_per_s:6.1f} tok/s tau {g.stats.mean_accepted:.2f}",
                      flush=True)
    report(prompts, specs, runs)


def report(prompts, specs, runs) -> None:
    cats = [p["category"] for p in prompts]
    print(f"{'category':15s}" + "".join(f"{m:>22s}" for m in specs))
    totals = {m: [0, 0.0, 0] for m in specs}  # tokens, seconds, forwards
    for c in cats:
        ar = runs[(c, "ar")]
        ar_s = statistics.median(g.stats.wall_s for g in ar)
        cells = []
        for m in specs:
            gens = runs[(c, m)]
            wall = statistics.median(g.stats.wall_s for g in gens)
            g = gens[0]
            assert g.token_ids == ar[0].token_ids, f"{m} differs from ar on {c}"
            t = totals[m]
            t[0] += g.stats.new_tokens; t[1] += wall; t[2] += g.stats.target_forwards
            cells.append(f"{g.stats.new_tokens / wall:6.1f}t/s x{ar_s / wall:4.2f} tau{g.stats.mean_accepted:4.2f}")
        print(f"{c:15s}" + "".join(f"{x:>22s}" for x in cells))
    ar_rate = totals["ar"][0] / totals["ar"][1]
    print(f"{'overall':15s}" + "".join(
        f"{t[0] / t[1]:6.1f}t/s x{t[0] / t[1] / ar_rate:4.2f} tau{t[0] / t[2]:4.2f}".rjust(22) for t in totals.values()))


if __name__ == "__main__":
    main()

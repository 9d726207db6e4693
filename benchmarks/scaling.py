"""N continuations of one prompt: forked from one prefill vs N independent requests.

Three ways to get N samples of the same prompt on the same weights, interleaved per repeat, each from
a cold prefix cache:

  fork         one request with SamplingParams(n=N): the prompt is prefilled once, N sequences share
               its KV blocks and decode together (what forerun.scaling's strategies submit);
  batch        N requests of n=1 submitted together to an engine without prefix caching: they decode
               together, but each prefills the prompt;
  sequential   N requests one after another (the prefix cache reset before each): no sharing at all.

Every sample decodes exactly --tokens tokens (EOS ignored), so the three do the same decoding work
apart from prefill and batching. Prints medians, ratios and the prefill account of each, and writes
them to --out as JSON.

    python benchmarks/scaling.py --quant q4 --n 16 --tokens 128 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from forerun import LLM
from forerun.config import EngineConfig, SamplingParams, SpecConfig
from forerun.engine.engine import Engine
from forerun.scaling.tasks import arithmetic

SPEC = SpecConfig(method="ar")


def run_requests(engine: Engine, prompt: list[int], params: list[SamplingParams]) -> dict:
    """Submit requests together, step until all finish; wall time, tokens and prefill."""
    start = time.perf_counter()
    ids = [engine.add_request(prompt, p, SPEC) for p in params]
    done = {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.generations
    wall = time.perf_counter() - start
    gens = [g for rid in ids for g in done[rid]]
    return {"wall_s": wall, "samples": len(gens), "new_tokens": sum(g.stats.new_tokens for g in gens),
            "prefill_tokens": sum(g.stats.prefill_tokens for g in gens)}


def fork(engine: Engine, prompt: list[int], n: int, tokens: int, seed: int) -> dict:
    engine.reset_prefix_cache()
    return run_requests(engine, prompt, [_params(tokens, seed, n)])


def batch(engine: Engine, prompt: list[int], n: int, tokens: int, seed: int) -> dict:
    return run_requests(engine, prompt, [_params(tokens, seed * 1000 + i, 1) for i in range(n)])


def sequential(engine: Engine, prompt: list[int], n: int, tokens: int, seed: int) -> dict:
    parts = []
    for i in range(n):
        engine.reset_prefix_cache()
        parts.append(run_requests(engine, prompt, [_params(tokens, seed * 1000 + i, 1)]))
    return {k: sum(p[k] for p in parts) for k in parts[0]}


def _params(tokens: int, seed: int, n: int) -> SamplingParams:
    return SamplingParams(temperature=0.7, seed=seed, max_new_tokens=tokens, ignore_eos=True, n=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--quant", choices=["q4"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="scaling-fork-out")
    a = ap.parse_args()

    llm = LLM(a.model, quant=a.quant, device=a.device)
    no_cache = Engine(llm.runtime, EngineConfig(prefix_caching=False))
    prompt = llm.encode(arithmetic(1).problems()[0].question)
    ways = {"fork": (fork, llm.engine), "batch": (batch, no_cache), "sequential": (sequential, llm.engine)}
    for way, (fn, engine) in ways.items():  # warm-up: kernels, buffers, allocator
        fn(engine, prompt, 2, 8, 0)
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    for rep in range(a.repeats):
        for way, (fn, engine) in ways.items():
            runs[way].append(fn(engine, prompt, a.n, a.tokens, rep + 1))
            print(f"repeat {rep}: {way:10s} {runs[way][-1]['wall_s']:.2f} s", flush=True)
    median = {way: statistics.median(r["wall_s"] for r in rs) for way, rs in runs.items()}
    summary = {"device": a.device, "quant": a.quant, "n": a.n, "tokens": a.tokens, "prompt_tokens": len(prompt),
               "repeats": a.repeats, "median_wall_s": median,
               "prefill_tokens": {way: rs[0]["prefill_tokens"] for way, rs in runs.items()},
               "new_tokens": {way: rs[0]["new_tokens"] for way, rs in runs.items()},
               "speedup_fork_vs_sequential": median["sequential"] / median["fork"],
               "speedup_fork_vs_batch": median["batch"] / median["fork"], "runs": runs}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "fork.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{a.n} samples x {a.tokens} tokens of a {len(prompt)}-token prompt ({a.device}, quant {a.quant}), "
          f"median of {a.repeats}:")
    print("| way | wall s | prefill tokens | new tokens |\n|---|---:|---:|---:|")
    for way in ways:
        print(f"| {way} | {median[way]:.2f} | {summary['prefill_tokens'][way]} | {summary['new_tokens'][way]} |")
    print(f"\nfork vs sequential: {summary['speedup_fork_vs_sequential']:.2f}x; "
          f"fork vs batch of independent requests: {summary['speedup_fork_vs_batch']:.2f}x")


if __name__ == "__main__":
    main()

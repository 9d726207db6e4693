"""The batched engine's own speed targets, each measured side by side in one process on the same
weights (the embedded SmolLM2-135M-Instruct in q4 unless told otherwise), greedy unless stated:

  1. n samples: `SamplingParams(n=8)` on a 600+ token Spec-Bench summarization prompt (one prefill,
     eight sequences forked from it) against eight separate requests submitted together with the
     prefix cache off (eight prefills); wall time, target >= 3x. Also shown: the eight separate
     requests with the prefix cache on.
  2. Prefix caching: a request whose first ~500 tokens another request already computed, against
     the same request on a cold cache; time to first token, target >= 3x.
  3. Goodput policy: at concurrency 1, `--budget goodput` with prompt lookup against `pld` alone
     (target: matches or beats it); at concurrency 16 (16 requests in flight), against batched `ar`
     (target >= 0.95x). Aggregate tok/s over the same Spec-Bench prompts, end to end.

Each measurement alternates its contenders (A B, A B, ...) and reports the median and every run.

    python benchmarks/engine_targets.py                      # all three
    python benchmarks/engine_targets.py --only goodput --prompts 32
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

from forerun import LLM, SamplingParams, SpecConfig
from forerun.bench.datasets import load_questions
from forerun.bench.harness import machine_description, versions
from forerun.config import EngineConfig

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared" / "data" / "spec_bench" / "question.jsonl"


def run_all(
    engine, requests: list[tuple[list[int], SamplingParams, SpecConfig]], in_flight: int
) -> tuple[float, list]:
    """Every request through the engine, at most `in_flight` at once; (wall seconds, generations)."""
    queue, order, done = list(enumerate(requests)), {}, {}
    start = time.perf_counter()
    while queue or engine.has_unfinished():
        while queue and len(order) - len(done) < in_flight:
            i, (prompt, params, spec) = queue.pop(0)
            order[engine.add_request(prompt, params, spec)] = i
        for out in engine.step():
            if out.finished:
                done[order[out.request_id]] = out.generations
    return time.perf_counter() - start, [done[i] for i in range(len(requests))]


def n_samples(llm: LLM, prompt: list[int], repeats: int, log) -> dict:
    sampled = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=64, seed=0, ignore_eos=True)
    cold = LLM(runtime=llm.runtime, engine=EngineConfig(prefix_caching=False))
    spec = SpecConfig()
    separate = [(prompt, SamplingParams(**{**_fields(sampled), "seed": i}), spec) for i in range(8)]
    runs = {"n=8": [], "8 requests, no prefix cache": [], "8 requests, prefix cache": []}
    for r in range(repeats):
        llm.engine.reset_prefix_cache()
        wall, (gens,) = run_all(llm.engine, [(prompt, SamplingParams(**{**_fields(sampled), "n": 8}), spec)], 8)
        runs["n=8"].append(
            {
                "wall_s": wall,
                "prefill_tokens": sum(g.stats.prefill_tokens for g in gens[0].samples)
                if gens[0].samples
                else sum(g.stats.prefill_tokens for g in gens),
                "new_tokens": sum(len(g.token_ids) for g in gens),
            }
        )
        for name, engine in (("8 requests, no prefix cache", cold.engine), ("8 requests, prefix cache", llm.engine)):
            engine.reset_prefix_cache()
            wall, gens = run_all(engine, separate, 8)
            runs[name].append(
                {
                    "wall_s": wall,
                    "prefill_tokens": sum(g[0].stats.prefill_tokens for g in gens),
                    "new_tokens": sum(len(g[0].token_ids) for g in gens),
                }
            )
        log(
            f"n samples, repeat {r + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]['wall_s']:.2f}s" for k, v in runs.items())
        )
    med = {k: statistics.median(x["wall_s"] for x in v) for k, v in runs.items()}
    return {
        "prompt_tokens": len(prompt),
        "runs": runs,
        "median_wall_s": med,
        "speedup_vs_separate_no_cache": med["8 requests, no prefix cache"] / med["n=8"],
        "speedup_vs_separate_cache": med["8 requests, prefix cache"] / med["n=8"],
    }


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}


def prefix_ttft(llm: LLM, articles: list[list[int]], questions: list[list[int]], log) -> dict:
    """For each article (cut to 500 tokens): TTFT of a question after it on a cold cache, and of the
    same question after another question on the same article (untimed) cached the article's blocks.
    Each measurement starts from an emptied cache; which goes first alternates per article (cold
    first on even articles, warm first on odd), so drift of a shared machine falls on both."""
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    pairs = []
    for i, article in enumerate(articles):
        prefix = article[:500]
        first, second = questions[i % len(questions)], questions[(i + 1) % len(questions)]
        order = (_cold_ttft, _warm_ttft) if i % 2 == 0 else (_warm_ttft, _cold_ttft)
        runs = {}
        for measure in order:
            runs.update(measure(llm, prefix, first, second, params))
        cold, warm = runs["cold"], runs["warm"]
        pairs.append(
            {
                "order": "cold first" if i % 2 == 0 else "warm first",
                "prompt_tokens": len(prefix + second),
                "cached_tokens": warm.stats.cached_tokens,
                "cold_ttft_s": cold.stats.ttft_s,
                "warm_ttft_s": warm.stats.ttft_s,
                "first_ttft_s": runs["primer"].stats.ttft_s,
                "same_output": cold.token_ids == warm.token_ids,
            }
        )
        log(
            f"prefix {i + 1}/{len(articles)} ({pairs[-1]['order']}): cold {cold.stats.ttft_s * 1e3:.0f} ms, "
            f"warm {warm.stats.ttft_s * 1e3:.0f} ms ({warm.stats.cached_tokens} tokens cached)"
        )
    ratios = [p["cold_ttft_s"] / p["warm_ttft_s"] for p in pairs]
    return {
        "pairs": pairs,
        "median_ratio": statistics.median(ratios),
        "median_cold_ttft_s": statistics.median(p["cold_ttft_s"] for p in pairs),
        "median_warm_ttft_s": statistics.median(p["warm_ttft_s"] for p in pairs),
        "outputs_equal": sum(p["same_output"] for p in pairs),
    }


def _cold_ttft(llm: LLM, prefix: list[int], first: list[int], second: list[int], params) -> dict:
    """The second question after the article on an emptied cache."""
    llm.engine.reset_prefix_cache()
    return {"cold": llm.generate_ids(prefix + second, params, SpecConfig())}


def _warm_ttft(llm: LLM, prefix: list[int], first: list[int], second: list[int], params) -> dict:
    """The second question after the article once the first question (the primer) has cached it."""
    llm.engine.reset_prefix_cache()
    primer = llm.generate_ids(prefix + first, params, SpecConfig())
    return {"primer": primer, "warm": llm.generate_ids(prefix + second, params, SpecConfig())}


def goodput(llm: LLM, prompts: list[list[int]], repeats: int, log) -> dict:
    params = SamplingParams(max_new_tokens=64)
    contenders = {
        "ar": SpecConfig(),
        "pld": SpecConfig(method="pld"),
        "pld+goodput": SpecConfig(method="pld", budget="goodput"),
        "recycle+goodput": SpecConfig(method="recycle", budget="goodput"),
    }
    levels = {1: ["pld", "pld+goodput", "recycle+goodput", "ar"], 16: ["ar", "pld+goodput", "recycle+goodput", "pld"]}
    out = {}
    reference = None
    for level, names in levels.items():
        rates: dict[str, list[float]] = {n: [] for n in names}
        differ: dict[str, int] = {}
        for r in range(repeats):
            for name in names:
                llm.engine.reset_prefix_cache()
                wall, gens = run_all(llm.engine, [(p, params, contenders[name]) for p in prompts], level)
                ids = [g[0].token_ids for g in gens]
                reference = reference or (ids if name == "ar" else None)
                if reference is not None:
                    differ[name] = sum(a != b for a, b in zip(ids, reference))
                rates[name].append(sum(map(len, ids)) / wall)
            log(
                f"goodput, concurrency {level}, repeat {r + 1}/{repeats}: "
                + ", ".join(f"{n} {v[-1]:.1f} tok/s" for n, v in rates.items())
            )
        med = {n: statistics.median(v) for n, v in rates.items()}
        out[level] = {"tokens_per_s": rates, "median": med, "differ_from_ar": differ}
    out["goodput_vs_pld_at_1"] = out[1]["median"]["pld+goodput"] / out[1]["median"]["pld"]
    out["goodput_vs_ar_at_16"] = out[16]["median"]["pld+goodput"] / out[16]["median"]["ar"]
    return out


def report(meta: dict, results: dict) -> str:
    lines = [
        f"# forerun engine targets ({meta['date'][:10]})",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- versions: {meta['versions']}",
        f"- weights: {meta['weights']}",
        "",
    ]
    if "n_samples" in results:
        n = results["n_samples"]
        lines += [
            f"## n = 8 samples of one {n['prompt_tokens']}-token summarization prompt (T = 0.8, 64 tokens)",
            "",
            "| contender | median wall s | prefill tokens computed | runs (s) |",
            "|---|---|---|---|",
        ]
        for name, runs in n["runs"].items():
            lines.append(
                f"| {name} | {n['median_wall_s'][name]:.2f} | {runs[0]['prefill_tokens']} | "
                + ", ".join(f"{x['wall_s']:.2f}" for x in runs)
                + " |"
            )
        lines += [
            "",
            f"n=8 vs 8 separate requests without the prefix cache: **{n['speedup_vs_separate_no_cache']:.2f}x** "
            f"(target >= 3x); with it: {n['speedup_vs_separate_cache']:.2f}x",
            "",
        ]
    if "prefix" in results:
        p = results["prefix"]
        lines += [
            "## Time to first token with a 500-token prefix already cached",
            "",
            f"{len(p['pairs'])} articles; median TTFT cold {p['median_cold_ttft_s'] * 1e3:.0f} ms, "
            f"warm {p['median_warm_ttft_s'] * 1e3:.0f} ms: **{p['median_ratio']:.2f}x** (target >= 3x); "
            f"outputs equal cold and warm: {p['outputs_equal']}/{len(p['pairs'])}",
            "",
        ]
    if "goodput" in results:
        g = results["goodput"]
        lines += [
            "## Goodput policy, aggregate tok/s (64 tokens, greedy)",
            "",
            "| concurrency | contender | median tok/s | runs | outputs differing from ar |",
            "|---|---|---|---|---|",
        ]
        for level in (1, 16):
            for name, rates in g[level]["tokens_per_s"].items():
                lines.append(
                    f"| {level} | {name} | {g[level]['median'][name]:.1f} | "
                    + ", ".join(f"{r:.1f}" for r in rates)
                    + f" | {g[level]['differ_from_ar'].get(name, '-')} |"
                )
        lines += [
            "",
            f"pld+goodput vs pld at concurrency 1: **{g['goodput_vs_pld_at_1']:.2f}x** (target >= 1.0x); "
            f"vs batched ar at concurrency 16: **{g['goodput_vs_ar_at_16']:.2f}x** (target >= 0.95x)",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["n", "prefix", "goodput"], help="one measurement (default: all)")
    p.add_argument("--dataset", default=str(DATASET))
    p.add_argument("--prompts", type=int, default=32, help="Spec-Bench prompts for the goodput runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", help="HF directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quant", default="q4", help="q4 (default) or none")
    p.add_argument("--out", help="directory for results.json and report.md")
    a = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    llm = LLM(a.model, quant=None if a.quant == "none" else a.quant)
    questions = load_questions(a.dataset, None, None)
    encode = lambda text: llm.encode(text)  # noqa: E731  (the chat template)
    results = {}
    if a.only in (None, "n"):
        article = next(
            ids for q in questions if q.category == "summarization" for ids in [encode(q.turns[0])] if len(ids) >= 600
        )
        results["n_samples"] = n_samples(llm, article, a.repeats, log)
    if a.only in (None, "prefix"):
        articles = [
            ids
            for q in questions
            if q.category == "summarization"
            for ids in [llm.encode(q.turns[0], chat=False)]
            if len(ids) >= 520
        ][:5]
        asks = [
            llm.encode(f"\n\nQuestion: {q.turns[0]}\nAnswer:", chat=False) for q in questions if q.category == "qa"
        ][:5]
        results["prefix"] = prefix_ttft(llm, articles, asks, log)
    if a.only in (None, "goodput"):
        by_category: dict[str, list] = {}
        for q in questions:
            by_category.setdefault(q.category, []).append(q)
        spread = [q for i in range(a.prompts) for qs in by_category.values() if i < len(qs) for q in [qs[i]]][
            : a.prompts
        ]
        results["goodput"] = goodput(llm, [encode(q.turns[0]) for q in spread], a.repeats, log)
    meta = {
        "command": " ".join(["python", "benchmarks/engine_targets.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description("cpu"),
        "versions": versions(),
        "weights": llm.runtime.model.quantization or str(llm.runtime.model.dtype),
    }
    text = report(meta, results)
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text + "\n")
        (out / "results.json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

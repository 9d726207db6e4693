"""What one verification forward costs as a function of the rows it verifies.

Fills the KV cache with `--cached` tokens of a prompt, then times forwards of 1, 2, 4, ... rows
(a chain: each row attends to the cache and the rows before it) at that position, without
committing them. Prints a markdown table: the median milliseconds of one row, and every other
width as a multiple of it. This is the curve a tree budget (SpecConfig.budget = "cost") learns
online; a drafter's tree pays only where its expected accepted tokens exceed it.

On the CPU it also prints the AR roofline: the read bandwidth (forerun.bench.roofline, best of 7
streaming sums), the weight bytes one step reads, and how close the one-row forward comes to
streaming them at that bandwidth (bound / measured), for each cache length.

With `--prompt N` (CPU, q4) it also times prompt processing: one forward of an N-token prompt from
an empty cache, logits for its last row only (a prefill), on the q4 blocks and, interleaved, on the
same weights dequantized to float32 (the path q4 prompts took before they ran on the q4 kernels).

`--kv-compare` (q4) times forwards of 1 and 8 rows over a float32 and a float16 KV pool holding the
same keys, alternating, at each cache length: what the q4 path's float16 pool saves.

    python benchmarks/row_cost.py --quant q4 --prompt 512     # the embedded model, CPU
    python benchmarks/row_cost.py --quant q4 --kv-compare --cached 200,800,2000
    python benchmarks/row_cost.py --device cuda --model M.gguf
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from forerun.bench.contenders import weight_bytes_per_token
from forerun.bench.roofline import measure_bandwidth
from forerun.cache import KVCache
from forerun.models.batch import ForwardBatch, Segment
from forerun.models.runtime import load


def time_forward(model, tokens: torch.Tensor, cached: int, cache, repeats: int, sync) -> float:
    """Median seconds of one forward of `tokens` as a chain placed after `cached` cache slots."""
    n = tokens.shape[0]
    batch = ForwardBatch.contiguous(tokens, torch.arange(cached, cached + n), cached)
    out = []
    for _ in range(repeats + 1):  # the first is a warm-up
        sync()
        t0 = time.perf_counter()
        model(batch, cache)
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out[1:])


def alternating(calls: dict, repeats: int) -> dict:
    """Median seconds of each call, the calls alternating run by run so that drift of a shared machine
    falls on all; the first round is a warm-up."""
    runs = {name: [] for name in calls}
    for i in range(repeats + 1):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            if i:
                runs[name].append(time.perf_counter() - t0)
    return {name: statistics.median(r) for name, r in runs.items()}


def time_prefill(models: dict, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of a prefill of `ids` (logits for the last row) for each model, alternating."""
    n = ids.shape[0]
    batch = ForwardBatch.pack([Segment(ids, torch.arange(n), torch.arange(n), logits_from=n - 1)])
    caches = {name: model.new_cache(n) for name, model in models.items()}
    return alternating({name: lambda m=model, c=caches[name]: m(batch, c) for name, model in models.items()}, repeats)


def compare_kv(model, ids: torch.Tensor, lengths: list[int], repeats: int) -> None:
    """One and eight rows over a float32 and a float16 pool filled with the same tokens, alternating."""
    a, slots = model.args, max(lengths) + 8
    pools = {dtype: KVCache(a.num_layers, a.num_kv_heads, a.head_dim, slots, dtype, model.device)
             for dtype in (torch.float32, torch.float16)}
    for pool in pools.values():
        model(ForwardBatch.contiguous(ids[:max(lengths)], torch.arange(max(lengths)), 0, logits=False), pool)
    print()
    print(f"KV pool dtype (median of {repeats}, alternating):")
    print()
    print("| cached tokens | rows | float32 KV | float16 KV | float32 / float16 |")
    print("|---|---|---|---|---|")
    for cached in lengths:
        for rows in (1, 8):
            batch = ForwardBatch.contiguous(ids[cached:cached + rows], torch.arange(cached, cached + rows), cached)
            s = alternating({dtype: lambda p=pool, b=batch: model(b, p) for dtype, pool in pools.items()}, repeats)
            f32, f16 = s[torch.float32], s[torch.float16]
            print(f"| {cached} | {rows} | {f32 * 1e3:.2f} ms | {f16 * 1e3:.2f} ms | {f32 / f16:.2f}x |")


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quant", choices=["q4"])
    p.add_argument("--cached", default="200,800", help="cache lengths, comma-separated (default: %(default)s)")
    p.add_argument("--rows", default="1,2,4,8,16,32,64", help="widths, comma-separated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--prompt", type=int, default=0, help="also time a prefill of this many tokens (CPU, q4)")
    p.add_argument("--kv-compare", action="store_true", help="also: float32 against float16 KV pools (q4)")
    a = p.parse_args()
    rt = load(a.model, dtype=a.dtype, device=a.device, quant=a.quant)
    model, device = rt.model, rt.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    widths = [int(x) for x in a.rows.split(",")]
    lengths = [int(x) for x in a.cached.split(",")]
    vocab = model.args.vocab_size
    ids = torch.randint(0, vocab, (max(max(lengths) + max(widths), a.prompt),),
                        generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(max(lengths) + max(widths))
    model(ForwardBatch.contiguous(ids[: max(lengths)], torch.arange(max(lengths)), 0, logits=False), cache)  # fill it
    weights = f"{a.dtype}" + (f", {a.quant}" if a.quant else "")
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"weights: {weights}, torch threads: {torch.get_num_threads()}, median of {a.repeats}")
    print()
    print("| cached tokens | " + " | ".join(f"{w} rows" for w in widths) + " |")
    print("|---" * (len(widths) + 1) + "|")
    first = {}
    for cached in lengths:
        cells = []
        for w in widths:
            s = time_forward(model, ids[cached: cached + w], cached, cache, a.repeats, sync)
            first.setdefault(cached, s)
            cells.append(f"{s * 1e3:.1f} ms" if w == widths[0] else f"{s / first[cached]:.2f}x")
        print(f"| {cached} | " + " | ".join(cells) + " |")
    if device.type == "cpu" and widths[0] == 1:
        bandwidth, weights = measure_bandwidth("cpu"), weight_bytes_per_token(model, model.embed)
        bound = weights / bandwidth
        print()
        print(f"AR roofline: read bandwidth {bandwidth / 1e9:.1f} GB/s, {weights / 1e6:.1f} MB of weights a step, "
              f"bound {bound * 1e3:.2f} ms a row; one row reaches "
              + ", ".join(f"{bound / s:.0%} at {c} cached" for c, s in first.items())
              + " (KV reads not counted in the bound)")
    if a.kv_compare:
        compare_kv(model, ids, lengths, a.repeats)
    if a.prompt and a.quant == "q4" and device.type == "cpu":
        dense = load(a.model, dtype=a.dtype, device=a.device, quant="none").model
        s = time_prefill({"q4": model, "float32": dense}, ids[:a.prompt], a.repeats)
        print()
        print(f"prefill of a {a.prompt}-token prompt (median of {a.repeats}, alternating): "
              f"q4 kernels {s['q4'] * 1e3:.0f} ms = {a.prompt / s['q4']:.0f} tok/s; "
              f"float32 (dequantized) {s['float32'] * 1e3:.0f} ms = {a.prompt / s['float32']:.0f} tok/s; "
              f"q4 / float32 {s['float32'] / s['q4']:.2f}x")


if __name__ == "__main__":
    main()

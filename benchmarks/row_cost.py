"""What one verification forward costs as a function of the rows it verifies.

Fills the KV cache with `--cached` tokens of a prompt, then times forwards of 1, 2, 4, ... rows
(a chain: each row attends to the cache and the rows before it) at that position, without
committing them. Prints a markdown table: the median milliseconds of one row, and every other
width as a multiple of it. This is the curve a tree budget (SpecConfig.budget = "cost") learns
online; a drafter's tree pays only where its expected accepted tokens exceed it.

    python benchmarks/row_cost.py --quant q4                  # the embedded model, CPU
    python benchmarks/row_cost.py --device cuda --model M.gguf
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from forerun.models.batch import ForwardBatch
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
    a = p.parse_args()
    rt = load(a.model, dtype=a.dtype, device=a.device, quant=a.quant)
    model, device = rt.model, rt.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    widths = [int(x) for x in a.rows.split(",")]
    lengths = [int(x) for x in a.cached.split(",")]
    vocab = model.args.vocab_size
    ids = torch.randint(0, vocab, (max(lengths) + max(widths),), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(max(lengths) + max(widths))
    model(ForwardBatch.contiguous(ids[: max(lengths)], torch.arange(max(lengths)), 0, logits=False), cache)  # fill it
    weights = f"{a.dtype}" + (f", {a.quant}" if a.quant else "")
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"weights: {weights}, torch threads: {torch.get_num_threads()}, median of {a.repeats}")
    print()
    print("| cached tokens | " + " | ".join(f"{w} rows" for w in widths) + " |")
    print("|---" * (len(widths) + 1) + "|")
    for cached in lengths:
        one = None
        cells = []
        for w in widths:
            s = time_forward(model, ids[cached: cached + w], cached, cache, a.repeats, sync)
            if one is None:
                one = s
            cells.append(f"{s * 1e3:.1f} ms" if w == widths[0] else f"{s / one:.2f}x")
        print(f"| {cached} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

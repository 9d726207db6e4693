import os

import pytest
import torch

from forerun.models.args import ModelArgs
from forerun.models.llama import Transformer
from forerun.models.runtime import Runtime

VOCAB = 64


def tiny_args(arch: str = "llama", layers: int = 4, **kw) -> ModelArgs:
    base = dict(arch=arch, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=layers,
                num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                max_position_embeddings=256, tie_word_embeddings=False,
                attention_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    base.update(kw)
    return ModelArgs(**base)


def random_weights(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with a large output scale, so greedy text is varied rather than one repeated token."""
    g = torch.Generator().manual_seed(seed)
    d, h, kv, hd, ff = args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim, args.intermediate_size

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w = {"model.embed_tokens.weight": rnd(args.vocab_size, d, scale=1.0), "model.norm.weight": 1 + rnd(d),
         "lm_head.weight": rnd(args.vocab_size, d, scale=1.0)}
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": rnd(h * hd, d), p + "self_attn.k_proj.weight": rnd(kv * hd, d),
                  p + "self_attn.v_proj.weight": rnd(kv * hd, d), p + "self_attn.o_proj.weight": rnd(d, h * hd),
                  p + "mlp.gate_proj.weight": rnd(ff, d), p + "mlp.up_proj.weight": rnd(ff, d),
                  p + "mlp.down_proj.weight": rnd(d, ff), p + "input_layernorm.weight": 1 + rnd(d),
                  p + "post_attention_layernorm.weight": 1 + rnd(d)})
        if args.attention_bias:
            for n, size in (("q", h * hd), ("k", kv * hd), ("v", kv * hd)):
                w[p + f"self_attn.{n}_proj.bias"] = rnd(size)
        if args.qk_norm:
            w[p + "self_attn.q_norm.weight"] = 1 + rnd(hd)
            w[p + "self_attn.k_norm.weight"] = 1 + rnd(hd)
    return w


# FORERUN_TEST_DEVICE=cuda runs the tiny-model tests (equivalence, distribution, drafters) on a GPU.
DEVICE = os.environ.get("FORERUN_TEST_DEVICE", "cpu")


def tiny_runtime(arch: str = "llama", seed: int = 0, **kw) -> Runtime:
    args = tiny_args(arch, **kw)
    model = Transformer(args, random_weights(args, seed)).eval().to(DEVICE)
    return Runtime(model=model, tokenizer=None, name=f"tiny-{arch}-{seed}")


@pytest.fixture(scope="session")
def tiny():
    return tiny_runtime()


def tiny_hf_runtime(seed: int = 0, layers: int = 3) -> Runtime:
    """A random GPT-2 (outside the native Llama family) behind the transformers adapter. Weights are
    drawn wide (std 1 rather than GPT-2's 0.02) so that greedy choices are not near-ties."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from forerun.models.hf_adapter import HFAdapter

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=32, n_layer=layers, n_head=4,
                        initializer_range=1.0, attn_implementation="sdpa")
    return Runtime(model=HFAdapter(GPT2LMHeadModel(config)).to(DEVICE), tokenizer=None, name=f"tiny-gpt2-{seed}")

import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from forerun import LLM, SamplingParams, SpecConfig
from forerun.models.args import ModelArgs
from forerun.models.llama import Transformer
from forerun.models.runtime import Runtime
from forerun.retrieval.datastore import build, fingerprint_of

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


@pytest.fixture
def each_isa():
    """The q4/q8 kernel families the CPU has (AVX-512 VNNI, then AVX2), for a test to loop over with
    native.use_avx512(...); AVX-512 is turned back on after the test. Tests using it skip without kernels."""
    from forerun import kernels

    native = kernels.cpu_kernels()
    isas = ["avx512", "avx2"] if native.use_avx512(True) else ["avx2"]
    yield isas
    native.use_avx512(True)


@pytest.fixture(scope="session")
def tiny():
    return tiny_runtime()


@pytest.fixture(scope="module", params=["float32", "q4"])
def tiny_llama_each_format(request):
    """The tiny Llama (seed 1) in float32, then in q4 blocks on the native kernels."""
    rt = tiny_runtime("llama", seed=1)
    if request.param == "q4":
        assert rt.model.quantize()
    return rt


def tiny_hf_runtime(seed: int = 0, layers: int = 3) -> Runtime:
    """A random GPT-2 (outside the native Llama family) behind the transformers adapter. Weights are
    drawn wide (std 1 rather than GPT-2's 0.02) so that greedy choices are not near-ties."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from forerun.models.hf_adapter import HFAdapter

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=32, n_layer=layers, n_head=4,
                        initializer_range=1.0, attn_implementation="sdpa")
    return Runtime(model=HFAdapter(GPT2LMHeadModel(config)).to(DEVICE), tokenizer=None, name=f"tiny-gpt2-{seed}")


# --- helpers for the sampling, proposal, EOS and acceptance tests -------------------------------------

def small_vocab_runtime(seed: int, vocab: int = 8, layers: int = 2, head_scale: float = 0.3) -> Runtime:
    """A tiny random model with a few-token vocabulary, so a joint law of several tokens has few cells.
    The head is scaled down because random weights give near one-hot distributions otherwise."""
    rt = tiny_runtime(seed=seed, layers=layers, vocab_size=vocab)
    with torch.no_grad():
        rt.model.head.weight.mul_(head_scale)
    return rt


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[..., V] logits -> float64 probabilities after temperature, then top-k, then top-p (nucleus: the
    most likely tokens until their mass reaches top_p). Written apart from forerun.sampling, so that
    tests comparing against it do not check the library against itself."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = probs.argsort(dim=-1, descending=True)
    ranked = probs.gather(-1, order)
    keep = torch.ones_like(ranked, dtype=torch.bool)
    if top_k:
        keep[..., top_k:] = False
    ranked = ranked * keep
    share = ranked / ranked.sum(-1, keepdim=True)
    keep &= share.cumsum(-1) - share < top_p  # the mass of the more likely tokens kept before it
    out = torch.zeros_like(probs).scatter(-1, order, ranked * keep)
    return out / out.sum(-1, keepdim=True)


class StubTokenizer:
    """The least of a tokenizer that LLM, TextStream, DraftModel and the datastore check use, for tiny
    models: ids are written as numbers, and eos_ids end generation."""

    chat_template = None

    def __init__(self, eos_ids=()):
        self.eos_token_ids = frozenset(eos_ids)

    def decode(self, ids, skip_special: bool = True) -> str:
        return " ".join(str(i) for i in ids)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return [int(t) for t in text.split()]

    def same_vocab(self, other) -> bool:
        return isinstance(other, StubTokenizer)

    def fingerprint(self) -> str:
        return "stub-tokenizer"


def cycle_runtime(seed: int = 0, quantized: bool = False) -> tuple[Runtime, list[int]]:
    """(runtime, cycle): a tiny Llama that has learned one cycle through its whole vocabulary; greedy
    decoding after token cycle[i] gives cycle[i + 1], cycle[i + 2], ... (wrapping around).

    Every block's output projections are scaled to 5%, so the residual stream stays close to the
    current token's embedding and any exit layer predicts what the full model does (layer-skip and DEL
    accept); the head maps that embedding to the successor's logit with a margin of over 3 nats.
    Drafters that can see the cycle (in the prompt, a datastore, their memory or a model) must accept."""
    args = tiny_args("llama")
    w = random_weights(args, seed)
    cycle = torch.randperm(args.vocab_size, generator=torch.Generator().manual_seed(seed)).tolist()
    embed = w["model.embed_tokens.weight"]
    embed = embed / embed.norm(dim=-1, keepdim=True) * args.hidden_size ** 0.5  # RMS 1: the norm keeps it
    head = torch.empty_like(embed)
    head[cycle[1:] + cycle[:1]] = 8.0 * embed[cycle] / args.hidden_size
    w.update({"model.embed_tokens.weight": embed, "lm_head.weight": head,
              "model.norm.weight": torch.ones(args.hidden_size)})
    for i in range(args.num_layers):
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            w[f"model.layers.{i}.{name}"] *= 0.05
    rt = Runtime(model=Transformer(args, w).eval().to(DEVICE), tokenizer=None, name=f"tiny-cycle-{seed}")
    if quantized:
        assert rt.model.quantize()
    return rt, cycle


def cycle_case(kind: str, seed: int, tmp_path_factory, tokenizer=None) -> tuple[Runtime, list[int], list[int], str]:
    """(runtime, cycle, prompt, datastore directory) for a module fixture over kind "float32" or "q4":
    the cycle model (with `tokenizer`, if given), a prompt that has gone round the cycle once, and a
    datastore holding the cycle twice. q4 is skipped off the CPU."""
    if kind == "q4" and DEVICE != "cpu":
        pytest.skip("q4 is a CPU format")
    runtime, cycle = cycle_runtime(seed=seed, quantized=kind == "q4")
    if tokenizer is not None:
        runtime = Runtime(model=runtime.model, tokenizer=tokenizer, name=f"{runtime.name}-{kind}")
    store = tmp_path_factory.mktemp("datastore")
    build([cycle + cycle], fingerprint_of(runtime)).save(store)
    return runtime, cycle, cycle + cycle[:4], str(store)


def continuations_datastore(runtime: Runtime, path, prompts, max_new_tokens: int = 40) -> str:
    """A datastore (saved at `path`) of each prompt followed by its greedy continuation, plus random
    documents that make retrieval propose wrong branches too; returns the directory as a string."""
    llm = LLM(runtime=runtime)
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    docs = [p + llm.generate_ids(p, params, SpecConfig()).token_ids for p in prompts]
    g = torch.Generator().manual_seed(0)
    vocab = runtime.model.args.vocab_size
    docs += [torch.randint(0, vocab, (50,), generator=g).tolist() for _ in range(20)]
    build(docs, fingerprint_of(runtime)).save(path)
    return str(path)


# --- GGUF files ---------------------------------------------------------------------------------------

GGUF_TOKENS = ["<|endoftext|>", "<|im_end|>", "a", "b", "ab", "Ġ", "Ġab", "c"]  # padded to `vocab` with <tN>
GGUF_MERGES = ["a b", "Ġ ab"]


def write_gguf(path: Path, arch: str, dims: dict, tensors: dict, tokenizer_model: str = "gpt2",
               tokenizer: Callable[[gguf.GGUFWriter], None] | None = None) -> Path:
    """A GGUF file of `arch` (dims: layers, hidden, heads, kv_heads, ffn, vocab) with a tiny byte-level
    BPE tokenizer, or what `tokenizer(writer)` writes instead, and `tensors` by GGUF name: float
    arrays, or (raw blocks [N, bytes a row] uint8, gguf.GGMLQuantizationType)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(dims["hidden"])
    w.add_block_count(dims["layers"])
    w.add_feed_forward_length(dims["ffn"])
    w.add_head_count(dims["heads"])
    w.add_head_count_kv(dims["kv_heads"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if tokenizer is None:
        _write_byte_level_tokenizer(w, tokenizer_model, dims["vocab"])
    else:
        tokenizer(w)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            raw, kind = value
            w.add_tensor(name, raw, raw_dtype=kind)
        else:
            w.add_tensor(name, np.asarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _write_byte_level_tokenizer(w: gguf.GGUFWriter, tokenizer_model: str, vocab: int) -> None:
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt2")
    tokens = GGUF_TOKENS + [f"<t{i}>" for i in range(len(GGUF_TOKENS), vocab)]
    w.add_token_list(tokens)
    w.add_token_merges(GGUF_MERGES)
    w.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny-model tests on one intra-op thread, then restore the setting.

    Their tensors are far too small to gain from threads, while an oversubscribed machine (tests
    running beside other jobs) makes every multi-threaded GEMM wait on descheduled workers: a forward
    of a 2-layer, 64-wide model took 0.27 s on two threads and 1.3 ms on one under such load.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_eagle_head(runtime: Runtime, seed: int = 0, draft_vocab: int | None = None, aux=(1, 2, 3)):
    """An EAGLE-3 head with random weights for a tiny target: its drafts are mostly wrong, which is
    what the equivalence tests want. draft_vocab < the target's: a reduced vocabulary of every other id."""
    from forerun.heads.eagle3 import Eagle3Config, Eagle3Head

    args = runtime.model.args
    size = draft_vocab or args.vocab_size
    torch.manual_seed(seed)
    head = Eagle3Head(Eagle3Config.for_target(args, aux, size, runtime.name), runtime.model.embed.detach().float().cpu())
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.fill_(1.0)
    if size < args.vocab_size:
        head.set_vocabulary(torch.arange(0, args.vocab_size, args.vocab_size // size)[:size])
    return head.eval().requires_grad_(False)


def random_medusa_head(runtime: Runtime, seed: int = 0, heads: int = 3, draft_vocab: int | None = None,
                       layers: int = 1, scale: float = 0.3):
    """A Medusa head with random weights for a tiny target: its drafts are mostly wrong, which is what
    the equivalence tests want. draft_vocab < the target's: a reduced vocabulary of every other id."""
    from forerun.heads.medusa import MedusaConfig, MedusaHead

    args = runtime.model.args
    size = draft_vocab or args.vocab_size
    torch.manual_seed(seed)
    head = MedusaHead(MedusaConfig(hidden_size=args.hidden_size, vocab_size=args.vocab_size, num_heads=heads,
                                   num_layers=layers, draft_vocab_size=size if size < args.vocab_size else None))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, scale)
    if size < args.vocab_size:
        head.set_vocabulary(torch.arange(0, args.vocab_size, args.vocab_size // size)[:size])
    return head.eval().requires_grad_(False)


def auto_with_random_head(runtime: Runtime, spec):
    """`auto` over its spec's candidates, eagle with a random head (drafting even when it doubts) and the
    others built as auto builds them."""
    from dataclasses import replace

    from forerun.drafters.auto import Auto
    from forerun.drafters.eagle import Eagle
    from forerun.drafters.registry import build_drafter

    names = dict(spec.options)["candidates"].split(",")
    candidates = {}
    for name in names:
        sub = replace(spec, method=name, options={"min_accept": 0.0} if name == "eagle" else {})
        candidates[name] = Eagle(runtime, sub, head=random_eagle_head(runtime, draft_vocab=32)) if name == "eagle" \
            else build_drafter(runtime, sub)
    return Auto(runtime, spec, candidates=candidates)

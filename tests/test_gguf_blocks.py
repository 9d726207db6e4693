"""GGUF block types run as stored (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K): raw blocks read into the kernels'
formats equal the `gguf` package's dequantization exactly, the kernels multiply them within the error of
8-bit activations (the same bits on AVX-512 and AVX2, rows independent of the batch), and a tiny Llama
GGUF of mixed types loads natively, matches its float dequantization and decodes alike with `ar` and
`pld`."""
import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from conftest import write_gguf
from forerun import LLM, SamplingParams, SpecConfig, kernels
from forerun.models import quant
from forerun.models.batch import ForwardBatch
from forerun.models.llama import Linear
from forerun.models.runtime import load, resolve_quant

native = kernels.cpu_kernels()
needs_native = pytest.mark.skipif(native is None, reason="native CPU kernels unavailable here")
TYPES = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]

# Byte offsets of each type's float16 fields in a block, and the spread of (code x sub-block scale)
# that makes the weights' standard deviation about `std` times that field.
_F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q8_0: (0,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
_SPREAD = {T.Q4_0: 4.6, T.Q4_1: 4.6, T.Q8_0: 74.0, T.Q4_K: 170.0, T.Q5_K: 330.0, T.Q6_K: 1400.0}


def random_blocks(kind: T, n: int, k: int, rng: np.random.Generator, std: float = 1.0) -> np.ndarray:
    """[n, bytes a row] raw blocks of `kind` for an n x k weight: random codes and sub-block scales,
    random (valid) float16 scales and offsets."""
    block, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for at in _F16_FIELDS[kind]:
        d = rng.standard_normal((n, k // block)) * std / _SPREAD[kind]
        raw[..., at:at + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(n, -1)


def dequantized(raw: np.ndarray, kind: T, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, kind).reshape(n, k))


@pytest.mark.parametrize("kind", TYPES, ids=lambda t: t.name)
def test_blocks_read_as_stored_equal_ggufs_dequantization(kind):
    rng = np.random.default_rng(kind.value)
    raw = random_blocks(kind, 24, 512, rng)
    w = quant.from_gguf(raw, kind.name, 24, 512)
    assert torch.equal(quant.dequantize(w), dequantized(raw, kind, 24, 512))


def test_mixed_parts_meet_in_the_wider_format_exactly():
    rng = np.random.default_rng(1)
    parts = [(T.Q4_K, 32), (T.Q4_0, 16), (T.Q6_K, 16), (T.Q5_K, 8)]
    raws = [random_blocks(kind, n, 256, rng) for kind, n in parts]
    fused = quant.concat([quant.from_gguf(raw, kind.name, n, 256) for raw, (kind, n) in zip(raws, parts)])
    assert fused.kind == "q8" and fused.per16 and fused.scales.dtype == torch.float32
    expected = torch.cat([dequantized(raw, kind, n, 256) for raw, (kind, n) in zip(raws, parts)])
    assert torch.equal(quant.dequantize(fused), expected)
    q4 = quant.concat([quant.from_gguf(raws[i], parts[i][0].name, parts[i][1], 256) for i in (0, 1)])
    assert q4.kind == "q4" and q4.scales.dtype == torch.float32  # Q4_0's float16 scales widened


def activation_error_bound(x: torch.Tensor, w: quant.QuantWeight) -> torch.Tensor:
    """|y - x W^T| can be at most this: x is rounded to 8 bits per block of 32 (error at most half a
    step, max |x| / 254, per input), and that error multiplies W less its offsets (which multiply the
    exact block sums of x)."""
    step = x.view(x.shape[0], -1, 32).abs().amax(-1) / 127
    coded = quant.dequantize(w) - (0 if w.mins is None else w.mins.float().repeat_interleave(32, dim=1))
    return (step.repeat_interleave(32, dim=1) / 2) @ coded.abs().T


@needs_native
@pytest.mark.parametrize("kind", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n, k", [(40, 512), (17, 256)])
def test_native_matmul_is_the_dequantized_weights_within_int8_activations(each_isa, kind, n, k):
    rng = np.random.default_rng(n + kind.value)
    raw = random_blocks(kind, n, k, rng)
    w = quant.from_gguf(raw, kind.name, n, k)
    x = torch.from_numpy(rng.standard_normal((11, k)).astype(np.float32))
    exact = x.double() @ dequantized(raw, kind, n, k).double().T
    results = []
    for isa in each_isa:
        native.use_avx512(isa == "avx512")
        w.native = None  # repack for this kernel family (the layout is the same; cheap)
        results.append(quant.linear(x, w))
    y = results[0]
    slack = 1e-5 * (x.abs() @ quant.dequantize(w).abs().T)  # float32 rounding of the chain
    assert ((y.double() - exact).abs() <= activation_error_bound(x, w) + slack).all()
    assert all(torch.equal(r, y) for r in results)  # both families: the same bits
    for rows in (slice(0, 1), slice(3, 5), slice(2, 11)):  # a row does not depend on its batch
        assert torch.equal(quant.linear(x[rows], w), y[rows])


# -- a tiny Llama GGUF of mixed types -------------------------------------------------------------------

DIMS = dict(layers=2, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=64)
# Layer 0 as llama.cpp's Q4_K_M mixes it (Q6_K attn_v and ffn_down), layer 1 as Q5_K_M and legacy types.
LAYER_TYPES = [
    dict(attn_q=T.Q4_K, attn_k=T.Q4_K, attn_v=T.Q6_K, attn_output=T.Q4_0, ffn_gate=T.Q4_K, ffn_up=T.Q4_K,
         ffn_down=T.Q6_K),
    dict(attn_q=T.Q5_K, attn_k=T.Q5_K, attn_v=T.Q5_K, attn_output=T.Q5_K, ffn_gate=T.Q4_1, ffn_up=T.Q4_0,
         ffn_down=T.Q8_0),
]


def mixed_gguf(path, tied: bool):
    """Embedding and head: Q6_K tied (as Q4_K_M stores small tied models), or a float embedding and a
    Q8_0 output."""
    rng = np.random.default_rng(0)
    h, ffn, hd, vocab = DIMS["hidden"], DIMS["ffn"], DIMS["hidden"] // DIMS["heads"], DIMS["vocab"]
    rows = dict(attn_q=DIMS["heads"] * hd, attn_k=DIMS["kv_heads"] * hd, attn_v=DIMS["kv_heads"] * hd,
                attn_output=h, ffn_gate=ffn, ffn_up=ffn, ffn_down=h)
    tensors = {"output_norm.weight": 1 + 0.1 * rng.standard_normal(h)}
    if tied:
        tensors["token_embd.weight"] = (random_blocks(T.Q6_K, vocab, h, rng), T.Q6_K)
    else:
        tensors["token_embd.weight"] = rng.standard_normal((vocab, h))
        tensors["output.weight"] = (random_blocks(T.Q8_0, vocab, h, rng, std=0.3), T.Q8_0)
    for i, types in enumerate(LAYER_TYPES):
        tensors[f"blk.{i}.attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        tensors[f"blk.{i}.ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        for name, kind in types.items():
            k = ffn if name == "ffn_down" else h
            tensors[f"blk.{i}.{name}.weight"] = (random_blocks(kind, rows[name], k, rng, std=0.08), kind)
    return write_gguf(path, "llama", DIMS, tensors)


@pytest.fixture(scope="module", params=[True, False], ids=["tied-q6k", "untied-q8"])
def mixed(request, tmp_path_factory):
    """(native q4 runtime, float runtime) of the mixed GGUF."""
    folder = tmp_path_factory.mktemp("mixed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORERUN_CACHE", str(folder / "cache"))
        path = str(mixed_gguf(folder / "mixed.gguf", tied=request.param))
        return load(path, quant="auto"), load(path, quant="none")


@needs_native
def test_auto_runs_a_mixed_gguf_natively(mixed):
    q, f = mixed
    assert q.model.quantization is not None and f.model.quantization is None
    assert q.model.quantization.startswith("q4/q8 blocks")  # layer 0's qkv and down are int8 codes
    assert q.model.layers[1].q4_plan is None and q.model.layers[0].gate_up.quant.kind == "q4"
    assert resolve_quant("auto", q.name, "bfloat16", "cpu") is None


def test_native_blocks_are_the_float_paths_weights(mixed):
    """Every projection and the head, read from the file's blocks (Q/K rows un-permuted, mixed parts
    widened), dequantize to exactly the float path's weights."""
    q, f = mixed
    linears = [(a, b) for a, b in zip(q.model.modules(), f.model.modules()) if isinstance(a, Linear)]
    assert len(linears) == 4 * DIMS["layers"] + 1
    for blocks, floats in linears:
        assert torch.equal(quant.dequantize(blocks.quant), floats.weight)


def forward_logits(runtime, tokens):
    batch = ForwardBatch.contiguous(torch.tensor(tokens), torch.arange(len(tokens)), 0)
    with torch.inference_mode():
        return runtime.model(batch, runtime.model.new_cache(len(tokens))).logits


@needs_native
def test_native_blocks_compute_the_dequantized_model(mixed):
    """Logits of a prompt, native blocks vs float32 on the dequantized weights: the same function up to
    8-bit activations, which on this random model (two layers, weights with offsets) move the logits by
    about 4% (a wrong row order or scale would move them by their whole size)."""
    q, f = mixed
    tokens = [2, 5, 9, 30, 7, 41, 3, 3, 60, 12, 8, 19]
    native_logits, float_logits = forward_logits(q, tokens), forward_logits(f, tokens)
    assert (native_logits - float_logits).norm() < 0.08 * float_logits.norm()
    assert (native_logits.argmax(-1) == float_logits.argmax(-1)).float().mean() >= 0.75


@needs_native
def test_ar_and_pld_decode_alike_on_native_blocks(mixed):
    q, _ = mixed
    llm = LLM(runtime=q)
    greedy = SamplingParams(max_new_tokens=32, ignore_eos=True)
    prompt = [2, 5, 9, 30, 7, 41, 2, 5, 9, 30]
    ar = llm.generate_ids(prompt, greedy, SpecConfig()).token_ids
    assert llm.generate_ids(prompt, greedy, SpecConfig(method="pld")).token_ids == ar

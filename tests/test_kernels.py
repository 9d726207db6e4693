"""Block quantization (q4/q8) and the native CPU kernels: exact round trips, agreement with plain
PyTorch, and rows that do not depend on the batch they come in (speculative verification, batched
decoding, chunked prompts and recomputation after preemption all need that)."""
import pytest
import torch
import torch.nn.functional as F

from forerun import kernels
from forerun.models import quant
from forerun.models.batch import ForwardBatch, Segment
from forerun.models.llama import Linear, apply_rope

native = kernels.cpu_kernels()
needs_native = pytest.mark.skipif(native is None, reason="native CPU kernels unavailable here")


def gguf_like(kind: str, n: int = 48, k: int = 96, seed: int = 0) -> torch.Tensor:
    """Float weights that a Q4_1 / Q8_0 file would dequantize to (f16 scales, extreme codes present)."""
    g = torch.Generator().manual_seed(seed)
    return quant.dequantize(quant.QUANTIZERS[kind](torch.randn(n, k, generator=g)))


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_requantizing_dequantized_blocks_is_exact(kind):
    w = gguf_like(kind)
    assert torch.equal(quant.dequantize(quant.QUANTIZERS[kind](w)), w)


def q8_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded to 8 bits per block of 32, as the q4 kernel sees it."""
    g = x.view(*x.shape[:-1], -1, 32)
    d = g.abs().amax(-1, keepdim=True) / 127
    return (torch.round(g / d) * d).view_as(x)


@needs_native
def test_q4_kernel_is_q4_weights_times_q8_activations():
    g = torch.Generator().manual_seed(0)  # unseeded, an x value at a rounding tie now and then broke the tolerance
    w = quant.quantize_q4(torch.randn(40, 128, generator=g))
    x = torch.randn(7, 128, generator=g)
    mins = w.mins.float().repeat_interleave(32, dim=1)
    # The offsets multiply the exact block sums of x; the codes multiply x rounded to q8.
    expected = q8_rows(x) @ (quant.dequantize(w) - mins).T + x @ mins.T
    torch.testing.assert_close(quant.linear(x, w), expected, rtol=1e-5, atol=1e-4)


@needs_native
def test_q8_kernel_is_q8_weights_times_q8_activations():
    g = torch.Generator().manual_seed(0)
    w = quant.quantize_q8(torch.randn(40, 128, generator=g))
    x = torch.randn(7, 128, generator=g)
    torch.testing.assert_close(quant.linear(x, w), q8_rows(x) @ quant.dequantize(w).T, rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("n, k", [(40, 96), (17, 64), (960, 576), (576, 1536)])
def test_vnni_and_avx2_kernels_give_the_same_bits(each_isa, kind, n, k):
    """Both kernel families compute each output as the same chain of float operations over exact
    integer block sums, so a CPU without AVX-512 decodes exactly as one with it."""
    g = torch.Generator().manual_seed(n + k)
    w = quant.QUANTIZERS[kind](torch.randn(n, k, generator=g))
    x = torch.randn(21, k, generator=g)
    results = []
    for isa in each_isa:
        native.use_avx512(isa == "avx512")
        assert native.cpu_features() == isa
        results.append(quant.linear(x, w))
    assert all(torch.equal(r, results[0]) for r in results)


@needs_native
@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_quantized_rows_do_not_depend_on_the_batch(kind):
    w = quant.QUANTIZERS[kind](torch.randn(40, 96))
    x = torch.randn(11, 96)
    batch = quant.linear(x, w)
    for rows in (slice(0, 1), slice(3, 5), slice(2, 9)):
        assert torch.equal(quant.linear(x[rows], w), batch[rows])


@pytest.mark.parametrize("n, k", [(1536, 576), (576, 1536), (960, 576), (64, 32), (32, 64), (160, 32)])
def test_float32_linear_rows_do_not_depend_on_the_batch(n, k):
    """The packed float32 path (SmolLM2's projection shapes and the tiny test models'): a row's output
    is the same bits from 1 row to a long prompt chunk."""
    g = torch.Generator().manual_seed(n + k)
    layer = Linear(torch.randn(n, k, generator=g))
    if not layer.pack_for_cpu():
        pytest.skip("this torch build has no oneDNN linear packing")
    x = torch.randn(300, k, generator=g)
    with torch.inference_mode():
        alone = torch.cat([layer(x[i:i + 1]) for i in range(0, 300, 23)])
        for rows in (2, 3, 8, 17, 64, 300):
            assert torch.equal(layer(x[:rows])[::23], alone[: -(-rows // 23)]), f"{rows} rows"


def test_without_native_kernels_quantized_layers_still_run(monkeypatch):
    w = quant.quantize_q4(torch.randn(16, 64))
    x = torch.randn(3, 64)
    monkeypatch.setattr(quant, "cpu_kernels", lambda: None)
    torch.testing.assert_close(quant.linear(x, w), x @ quant.dequantize(w).T)


@needs_native
def test_rms_norm_matches_torch():
    x, weight = torch.randn(5, 64), torch.randn(64)
    torch.testing.assert_close(native.rms_norm(x, weight, 1e-6), F.rms_norm(x, (64,), weight, 1e-6))


def random_tree_mask(T: int, seed: int) -> torch.Tensor:
    """[T, T] ancestor-or-self mask of a random tree in topological order (node 0 the root)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.eye(T, dtype=torch.bool)
    for t in range(1, T):
        mask[t] |= mask[int(torch.randint(0, t, (1,), generator=g))]
    return mask


def rope(positions: torch.Tensor, hd: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    freq = torch.rand(hd // 2, generator=torch.Generator().manual_seed(seed))
    angles = positions.float()[:, None] * freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def attend(qkv, cos, sin, k_pool, v_pool, segments, heads):
    batch = ForwardBatch.pack(segments)
    return native.batch_attention(qkv.contiguous(), cos.contiguous(), sin.contiguous(), k_pool, v_pool,
                                  batch.native(), heads, k_pool.shape[2] ** -0.5)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hd", [64, 96, 32])
def test_batch_attention_gives_the_same_bits_on_each_isa(each_isa, hd, dtype):
    """The value weighting runs 16 dims a register with AVX-512 and 8 with AVX2, each dim's lane
    taking the same multiply-adds in the same key order: a tree of 7 rows over 90 cached keys and a
    causal prompt chunk give the same bits either way, from a float32 or a float16 pool."""
    g = torch.Generator().manual_seed(hd)
    T, H, KV, prefix = 7, 9, 3, 90
    L, S = prefix + T, prefix + T + 10
    slots = torch.randperm(S, generator=g)[:L]
    qkv = torch.randn(T, (H + 2 * KV) * hd, generator=g)
    cos, sin = rope(torch.arange(prefix, L), hd)
    k_pool, v_pool = torch.randn(KV, S, hd, generator=g).to(dtype), torch.randn(KV, S, hd, generator=g).to(dtype)
    tokens = torch.zeros(T, dtype=torch.long)
    results = []
    for isa in each_isa:
        native.use_avx512(isa == "avx512")
        segments = [Segment(tokens, torch.arange(T), slots, random_tree_mask(T, seed=1)),
                    Segment(tokens, torch.arange(T), slots[:T])]  # a prompt chunk from slot 0, causal
        qkv2, cos2, sin2 = torch.cat([qkv, qkv]), torch.cat([cos, cos]), torch.cat([sin, sin])
        results.append(attend(qkv2, cos2, sin2, k_pool.clone(), v_pool.clone(), segments, H))
    assert all(torch.equal(r, results[0]) for r in results)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T, H, KV, hd, prefix",
                         [(5, 6, 2, 16, 9), (12, 9, 3, 64, 70), (3, 4, 4, 96, 33), (1, 9, 3, 64, 100)])
def test_batch_attention_matches_rope_pool_and_sdpa_with_a_tree_mask(T, H, KV, hd, prefix, dtype):
    """The native attention (rotate q/k, write k/v at the rows' pool slots, attend over the
    sequence's slots) against the PyTorch path, with the keys scattered over the pool, over head
    sizes with a partial 64-dim slice, key counts with a partial block, and several chunks of queries
    per kv head. A float16 pool (the q4 path's) stores keys and values rounded to float16, and
    attention is that of the rounded keys and values."""
    L, S = prefix + T, prefix + T + 40
    slots = torch.randperm(S, generator=torch.Generator().manual_seed(T))[:L]  # position i lives at slots[i]
    qkv = torch.randn(T, (H + 2 * KV) * hd)
    cos, sin = rope(torch.arange(prefix, L), hd)
    k_pool, v_pool = torch.randn(KV, S, hd).to(dtype), torch.randn(KV, S, hd).to(dtype)
    k_ref, v_ref = k_pool.float(), v_pool.float()
    tree = random_tree_mask(T, seed=T)
    mask = torch.cat([torch.ones(T, prefix, dtype=torch.bool), tree], dim=1)

    qk, v = qkv.split([(H + KV) * hd, KV * hd], dim=-1)
    q, k = apply_rope(qk.view(T, H + KV, hd), cos[:, None], sin[:, None]).split([H, KV], dim=1)
    k_ref[:, slots[prefix:]] = k.transpose(0, 1).to(dtype).float()
    v_ref[:, slots[prefix:]] = v.view(T, KV, hd).transpose(0, 1).to(dtype).float()
    expected = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k_ref[None][:, :, slots],
                                              v_ref[None][:, :, slots], attn_mask=mask,
                                              enable_gqa=True)[0].transpose(0, 1).reshape(T, H * hd)

    tokens = torch.zeros(T, dtype=torch.long)
    out = attend(qkv, cos, sin, k_pool, v_pool, [Segment(tokens, torch.arange(T), slots, tree)], H)
    assert k_pool.dtype == v_pool.dtype == dtype
    # a rotated key may round the other way in float16 when the two rotations differ by an ulp
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out, expected, **tolerance)
    torch.testing.assert_close(k_pool.float(), k_ref, rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-6)
    assert torch.equal(v_pool.float(), v_ref)
    for t in range(T):  # one query alone (keys of the others already in the pool) gives the same bits
        one = Segment(tokens[:1], torch.arange(1), slots[:prefix + t + 1], tree[t:t + 1, :t + 1])
        step = attend(qkv[t:t + 1], cos[t:t + 1], sin[t:t + 1], k_pool, v_pool, [one], H)
        assert torch.equal(step[0], out[t])
        # ... and so does plain decoding, where the node's ancestors follow the prefix directly
        ancestors = slots[prefix:prefix + t][tree[t, :t]]
        own = slots[prefix + t:prefix + t + 1]
        plain = Segment(tokens[:1], torch.arange(1), torch.cat([slots[:prefix], ancestors, own]))
        step = attend(qkv[t:t + 1], cos[t:t + 1], sin[t:t + 1], k_pool, v_pool, [plain], H)
        assert torch.equal(step[0], out[t])


@needs_native
def test_batch_attention_rows_do_not_depend_on_the_other_sequences():
    """Three sequences (a prompt chunk after a prefix, one token, a tree) in one call give each the
    bits it gets alone; a causal chunk's rows skip the keys after them without changing a bit."""
    H, KV, hd, S = 6, 2, 32, 200
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(S, generator=g)
    a, b, c = order[:40], order[40:60], order[60:100]
    tree = random_tree_mask(6, seed=1)
    segments = [Segment(torch.zeros(9, dtype=torch.long), torch.arange(31, 40), a),
                Segment(torch.zeros(1, dtype=torch.long), torch.arange(19, 20), b),
                Segment(torch.zeros(6, dtype=torch.long), torch.arange(34, 40), c, tree)]
    qkv = torch.randn(16, (H + 2 * KV) * hd, generator=g)
    cos, sin = rope(torch.cat([s.positions for s in segments]), hd)
    k_pool, v_pool = torch.randn(KV, S, hd, generator=g), torch.randn(KV, S, hd, generator=g)
    together = attend(qkv, cos, sin, k_pool, v_pool, segments, H)
    row = 0
    for s in segments:
        rows = slice(row, row + s.tokens.shape[0])
        assert torch.equal(attend(qkv[rows], cos[rows], sin[rows], k_pool, v_pool, [s], H), together[rows])
        row = rows.stop
    chunk = segments[0]  # row by row, each with exactly the keys up to its own
    for t in range(9):
        one = Segment(chunk.tokens[:1], chunk.positions[t:t + 1], a[:32 + t])
        assert torch.equal(attend(qkv[t:t + 1], cos[t:t + 1], sin[t:t + 1], k_pool, v_pool, [one], H)[0], together[t])


@needs_native
def test_fused_q4_layer_halves_agree_with_the_layer_op_by_op():
    """Layer by layer on the same input: across layers, rounding activations to 8 bits turns an ulp
    of difference (here, silu's exp) into a different code now and then, which a random model amplifies."""
    from conftest import tiny_runtime

    model = tiny_runtime("llama", seed=3).model
    assert model.quantize() and all(layer.q4_plan is not None for layer in model.layers)
    T = 5
    batch = ForwardBatch.contiguous(torch.zeros(T, dtype=torch.long), torch.arange(T), 0)
    cos, sin = model.rope.lookup(torch.arange(T), torch.float32, torch.device("cpu"))
    x = torch.randn(T, model.args.hidden_size, generator=torch.Generator().manual_seed(0))
    for i, layer in enumerate(model.layers):
        fused_cache, plain_cache = model.new_cache(8), model.new_cache(8)  # float16, as q4 layers store K/V
        fused = layer(x, i, fused_cache, batch, cos, sin)
        plan, layer.q4_plan = layer.q4_plan, None
        torch.testing.assert_close(fused, layer(x, i, plain_cache, batch, cos, sin), rtol=1e-5, atol=1e-5)
        layer.q4_plan = plan

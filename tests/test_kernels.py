"""Block quantization (q4/q8) and the native CPU kernels: exact round trips, agreement with plain
PyTorch, and rows that do not depend on the batch they come in (speculative verification needs that)."""
import pytest
import torch
import torch.nn.functional as F

from forerun import kernels
from forerun.models import quant
from forerun.models.llama import apply_rope

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
    w = quant.quantize_q4(torch.randn(40, 128))
    x = torch.randn(7, 128)
    mins = w.mins.float().repeat_interleave(32, dim=1)
    # The offsets multiply the exact block sums of x; the codes multiply x rounded to q8.
    expected = q8_rows(x) @ (quant.dequantize(w) - mins).T + x @ mins.T
    torch.testing.assert_close(quant.linear(x, w), expected, rtol=1e-5, atol=1e-4)


@needs_native
def test_q8_kernel_matches_dequantized_matmul():
    w = quant.quantize_q8(torch.randn(40, 128))
    x = torch.randn(7, 128)
    torch.testing.assert_close(quant.linear(x, w), x @ quant.dequantize(w).T, rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_quantized_rows_do_not_depend_on_the_batch(kind):
    w = quant.QUANTIZERS[kind](torch.randn(40, 96))
    x = torch.randn(11, 96)
    batch = quant.linear(x, w)
    for rows in (slice(0, 1), slice(3, 5), slice(2, 9)):
        assert torch.equal(quant.linear(x[rows], w), batch[rows])


@needs_native
def test_dense_prefill_path_agrees_with_the_kernel():
    w = quant.quantize_q8(torch.randn(40, 96))
    x = torch.randn(9, 96)
    torch.testing.assert_close(quant.linear(x, w, dense=True), quant.linear(x, w), rtol=1e-5, atol=1e-4)


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


@needs_native
@pytest.mark.parametrize("T, H, KV, hd, prefix", [(5, 6, 2, 16, 9), (12, 9, 3, 64, 70), (3, 4, 4, 96, 33), (1, 9, 3, 64, 100)])
def test_attention_step_matches_rope_cache_and_sdpa_with_a_tree_mask(T, H, KV, hd, prefix):
    """The fused decoding step (rotate q/k, write k/v to the cache, attend) against the PyTorch path,
    over head sizes with a partial 64-dim slice, key counts with a partial block, and several chunks
    of queries per kv head."""
    L = prefix + T
    qkv = torch.randn(T, (H + 2 * KV) * hd)
    angles = torch.arange(prefix, L, dtype=torch.float32)[:, None] * torch.rand(hd // 2)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    k_cache, v_cache = torch.randn(KV, L + 8, hd), torch.randn(KV, L + 8, hd)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    tree = random_tree_mask(T, seed=T)
    mask = torch.cat([torch.ones(T, prefix, dtype=torch.bool), tree], dim=1)

    qk, v = qkv.split([(H + KV) * hd, KV * hd], dim=-1)
    q, k = apply_rope(qk.view(T, H + KV, hd), cos[:, None], sin[:, None]).split([H, KV], dim=1)
    k_ref[:, prefix:L], v_ref[:, prefix:L] = k.transpose(0, 1), v.view(T, KV, hd).transpose(0, 1)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k_ref[None, :, :L], v_ref[None, :, :L],
                                              attn_mask=mask, enable_gqa=True)[0].transpose(0, 1).reshape(T, H * hd)

    out = native.attention_step(qkv, cos, sin, k_cache, v_cache, prefix, H, mask, hd ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, k_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, v_ref)
    for t in range(T):  # one query alone (keys of the others already cached) gives the same bits
        step = native.attention_step(qkv[t:t + 1].contiguous(), cos[t:t + 1].contiguous(), sin[t:t + 1].contiguous(),
                                     k_cache, v_cache, prefix + t, H, mask[t:t + 1, :prefix + t + 1].contiguous(),
                                     hd ** -0.5)
        assert torch.equal(step[0], out[t])
        # ... and so does plain decoding, where the node's ancestors sit in consecutive slots
        ancestors = [prefix + a for a in range(t) if tree[t, a]]
        k_plain, v_plain = k_cache.clone(), v_cache.clone()
        k_plain[:, prefix:prefix + len(ancestors)] = k_cache[:, ancestors]
        v_plain[:, prefix:prefix + len(ancestors)] = v_cache[:, ancestors]
        plain = native.attention_step(qkv[t:t + 1].contiguous(), cos[t:t + 1].contiguous(), sin[t:t + 1].contiguous(),
                                      k_plain, v_plain, prefix + len(ancestors), H, None, hd ** -0.5)
        assert torch.equal(plain[0], out[t])


@needs_native
def test_fused_q4_layer_halves_agree_with_the_layer_op_by_op():
    """Layer by layer on the same input: across layers, rounding activations to 8 bits turns an ulp
    of difference (here, silu's exp) into a different code now and then, which a random model amplifies."""
    from conftest import tiny_runtime

    model = tiny_runtime("llama", seed=3).model
    assert model.quantize() and all(layer.q4_halves is not None for layer in model.layers)
    T = 5
    angles = torch.arange(T, dtype=torch.float32)[:, None] * model.inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    x = torch.randn(T, model.args.hidden_size, generator=torch.Generator().manual_seed(0))
    for i, layer in enumerate(model.layers):
        fused = layer(x, i, model.new_cache(8), 0, cos, sin, mask, dense=False)
        halves, layer.q4_halves = layer.q4_halves, None
        torch.testing.assert_close(fused, layer(x, i, model.new_cache(8), 0, cos, sin, mask, dense=False),
                                   rtol=1e-5, atol=1e-5)
        layer.q4_halves = halves

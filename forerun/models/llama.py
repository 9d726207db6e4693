"""The Llama family (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5, Qwen3) in plain PyTorch.

One forward serves prefill, autoregressive steps and token-tree verification: every token carries
an explicit position, K/V are written into a static cache at explicit slots, and an optional tree
mask says which of the new tokens each new token may see (the committed prefix is always visible).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forerun import kernels
from forerun.cache import KVCache
from forerun.models import quant
from forerun.models.args import ModelArgs, RopeScaling


class Linear(nn.Module):
    """y = x W^T + b, with two faster CPU storages for W:

    - a oneDNN pre-packed float32 copy: on AVX2 CPUs it runs a 1..32-row GEMM at close to memory
      bandwidth, while the default BLAS path is 1.5-2x slower for the 2..16 rows a draft tree has;
    - GGUF-style blocks (q4 or q8, forerun.models.quant) run by a native kernel, 4.5 or 8.5 bits a weight.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.packed: Tensor | None = None
        self.quant: quant.QuantWeight | None = None

    def pack_for_cpu(self) -> bool:
        if self.weight.device.type != "cpu" or self.weight.dtype != torch.float32 or self.quant is not None:
            return False
        try:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, None)
        except (RuntimeError, AttributeError):  # a torch build without oneDNN
            return False
        return True

    def quantize(self, kind: str) -> bool:
        """Replace the float weight by `kind` ("q4" or "q8") blocks; False if its shape does not allow it."""
        if self.weight.dtype != torch.float32 or not quant.quantizable(self.weight):
            return False
        self.quant = quant.QUANTIZERS[kind](self.weight.data)
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.packed = None
        return True

    def forward(self, x: Tensor, dense: bool = False) -> Tensor:
        if self.quant is not None:
            y = quant.linear(x, self.quant, dense)
            return y if self.bias is None else y + self.bias
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, weight: Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        native = kernels.for_tensor(x)
        if native is not None and x.dim() == 2 and x.is_contiguous() and x.shape[-1] % 8 == 0:
            return native.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in float32 as HF does, then scale in the model dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


def rope_frequencies(args: ModelArgs) -> Tensor:
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    if args.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, args.rope_scaling)
    return inv_freq.float()  # [head_dim / 2]


def _llama3_scale(inv_freq: Tensor, rs: RopeScaling) -> Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, blended, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, 1, head_dim] (the half-split layout HF uses)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, args: ModelArgs, w: dict[str, Tensor]):
        super().__init__()
        self.args = args
        qkv_bias = torch.cat([w["q_proj.bias"], w["k_proj.bias"], w["v_proj.bias"]]) if args.attention_bias else None
        self.qkv = Linear(torch.cat([w["q_proj.weight"], w["k_proj.weight"], w["v_proj.weight"]]), qkv_bias)
        self.o = Linear(w["o_proj.weight"], w.get("o_proj.bias"))
        self.gate_up = Linear(torch.cat([w["gate_proj.weight"], w["up_proj.weight"]]))
        self.down = Linear(w["down_proj.weight"])
        self.attn_norm = RMSNorm(w["input_layernorm.weight"], args.rms_norm_eps)
        self.mlp_norm = RMSNorm(w["post_attention_layernorm.weight"], args.rms_norm_eps)
        self.q_norm = RMSNorm(w["q_norm.weight"], args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(w["k_norm.weight"], args.rms_norm_eps) if args.qk_norm else None
        # What the native attention step handles (no q/k norm; head sizes its vector loops cover).
        self.fusable = not args.qk_norm and args.head_dim % 8 == 0 and args.head_dim <= 256
        self.q4_halves: tuple | None = None  # native handles of qkv, o, gate_up, down (bind_q4)

    def bind_q4(self) -> None:
        """After quantization: run decoding steps as two native calls (attention half, MLP half)."""
        native = kernels.cpu_kernels()
        linears = (self.qkv, self.o, self.gate_up, self.down)
        if native is None or not self.fusable or any(m.quant is None or m.bias is not None for m in linears):
            return
        self.q4_halves = tuple(native.Q4(m.quant.codes, m.quant.scales, m.quant.mins) for m in linears)

    def forward(self, x: Tensor, layer: int, cache: KVCache, start: int, cos: Tensor, sin: Tensor,
                mask: Tensor | None, dense: bool) -> Tensor:
        if self.q4_halves is not None and not dense:
            return self._q4_step(x, layer, cache, start, cos, sin, mask)
        qkv = self.qkv(self.attn_norm(x), dense)
        native = kernels.for_tensor(x) if self.fusable and not dense else None
        if native is not None:  # a decoding step: few tokens, where each tensor op's fixed cost dominates
            T, hd = x.shape[0], self.args.head_dim
            out = native.attention_step(qkv, cos.view(T, hd), sin.view(T, hd), cache.k[layer], cache.v[layer],
                                        start, self.args.num_heads, mask, hd ** -0.5)
        else:
            out = self._attention(qkv, layer, cache, start, cos, sin, mask)
        x = x + self.o(out, dense)
        gate, up = self.gate_up(self.mlp_norm(x), dense).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up, dense)

    def _q4_step(self, x: Tensor, layer: int, cache: KVCache, start: int, cos: Tensor, sin: Tensor,
                 mask: Tensor | None) -> Tensor:
        native, (qkv, o, gate_up, down) = kernels.cpu_kernels(), self.q4_halves
        T, hd, eps = x.shape[0], self.args.head_dim, self.args.rms_norm_eps
        x = native.q4_attention_block(x.contiguous(), self.attn_norm.weight, eps, qkv, o, cos.view(T, hd),
                                      sin.view(T, hd), cache.k[layer], cache.v[layer], start,
                                      self.args.num_heads, mask, hd ** -0.5)
        return native.q4_mlp_block(x, self.mlp_norm.weight, eps, gate_up, down)

    def _attention(self, qkv: Tensor, layer: int, cache: KVCache, start: int, cos: Tensor, sin: Tensor,
                   mask: Tensor | None) -> Tensor:  # [T, heads * head_dim]
        a, T = self.args, qkv.shape[0]
        q_size, kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
        qk = qk.view(T, a.num_heads + a.num_kv_heads, a.head_dim)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :a.num_heads]), self.k_norm(qk[:, a.num_heads:])], dim=1)
        q, k = apply_rope(qk, cos, sin).split([a.num_heads, a.num_kv_heads], dim=1)  # one rotation for both
        keys, values = cache.write(layer, start, k, v.view(T, a.num_kv_heads, a.head_dim))
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
            attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=a.num_heads != a.num_kv_heads,
        )  # [1, heads, T, head_dim]
        return out[0].transpose(0, 1).reshape(T, q_size)


class CausalLM(nn.Module):
    """What the engine reads off every model: where it runs and in what dtype, both those of its
    token embedding table `embed`. Subclassed by Transformer and by the transformers adapter."""

    embed: Tensor

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype


class Transformer(CausalLM):
    """Weights come as a dict with Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...)."""

    def __init__(self, args: ModelArgs, weights: dict[str, Tensor]):
        super().__init__()
        self.args = args
        self.embed = nn.Parameter(weights["model.embed_tokens.weight"], requires_grad=False)
        self.layers = nn.ModuleList(
            Block(args, _layer_weights(weights, i)) for i in range(args.num_layers)
        )
        self.norm = RMSNorm(weights["model.norm.weight"], args.rms_norm_eps)
        head = weights["model.embed_tokens.weight"] if args.tie_word_embeddings else weights["lm_head.weight"]
        self.head = Linear(head)
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)

    @property
    def quantization(self) -> str | None:
        """How the weights are stored when not as plain floats, for labels; None otherwise."""
        return "q4 blocks, q8 head" if self.head.quant is not None else None

    def float32_logits(self) -> None:
        """Keep a float32 copy of the output head, so half-precision models give float32 logits.
        bf16 logits tie often (8 bits of mantissa over tens of thousands of tokens), and greedy
        decoding between tied tokens hangs on the last bit of every kernel's rounding."""
        if self.head.quant is None and self.head.weight.dtype != torch.float32:
            self.head = Linear(self.head.weight.float(), None if self.head.bias is None else self.head.bias.float())

    def pack_for_cpu(self) -> bool:
        """Pre-pack every projection for oneDNN; a no-op (False) off CPU or outside float32."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        return all([m.pack_for_cpu() for m in linears])

    def quantize(self) -> bool:
        """GGUF-style weights: q4 blocks for every projection inside the blocks, q8 for the output head
        (a Q4_1/Q8_0 GGUF such as the embedded SmolLM2 is recovered exactly). The embedding table
        stays float: a step reads only one row of it."""
        linears = [m for layer in self.layers for m in layer.modules() if isinstance(m, Linear)]
        if not (all([m.quantize("q4") for m in linears]) and self.head.quantize("q8")):
            return False
        for layer in self.layers:
            layer.bind_q4()
        return True

    def new_cache(self, max_len: int) -> KVCache:
        a = self.args
        return KVCache(a.num_layers, a.num_kv_heads, a.head_dim, max_len, self.dtype, self.device)

    def forward(
        self,
        tokens: Tensor,  # [T] token ids
        positions: Tensor,  # [T] rotary positions
        cache: KVCache,
        start: int,  # cache slot of tokens[0]; slots [0, start) hold the committed prefix
        tree_mask: Tensor | None = None,  # [T, K] bool over the K slots ending at start + T; None = causal
        num_layers: int | None = None,  # run only the first k layers (self-speculation)
        logits: bool = True,
        prefill: bool = False,  # a prompt: quantized layers may take the faster, differently rounded GEMM
    ) -> Tensor:  # [T, vocab] float32 logits, or [T, hidden] final-normed states
        x = F.embedding(tokens, self.embed)
        angles = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]  # [T, 1, head_dim]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        if prefill and start == 0 and tree_mask is None and self.args.sliding_window is None:
            mask = None  # a prompt from the first slot: SDPA's own causal kernel, faster than a mask
        else:
            mask = self._attention_mask(positions, start, tree_mask, cache)
        for i, layer in enumerate(self.layers[:num_layers]):
            x = layer(x, i, cache, start, cos, sin, mask, prefill)
        x = self.norm(x)
        if not logits:
            return x
        return self.head(x.to(self.head.weight.dtype) if self.head.quant is None else x, prefill).float()

    def _attention_mask(self, positions: Tensor, start: int, tree_mask: Tensor | None,
                        cache: KVCache) -> Tensor | None:
        """Slots before the tree mask's columns are the committed prefix, visible to every token."""
        T, device = positions.shape[0], positions.device
        window = self.args.sliding_window
        if T == 1 and tree_mask is None and (window is None or start < window):
            return None  # one token sees the whole prefix
        if tree_mask is None:
            tree_mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        visible = start + T - tree_mask.shape[1]
        prefix = torch.ones(T, visible, dtype=torch.bool, device=device)
        mask = torch.cat([prefix, tree_mask.to(device)], dim=1)  # [T, start + T]
        if window is not None:
            # Keys at known positions: the prefix (slot == position) and the new tokens themselves.
            # Earlier tree nodes (a tree grown over several forwards) lie a tree's depth back at most.
            prefix_pos = torch.arange(visible, device=device)
            mask[:, :visible] &= (positions[:, None] - prefix_pos[None, :]) < window
            mask[:, -T:] &= (positions[:, None] - positions[None, :]) < window
        return mask


def _layer_weights(weights: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    """Layer i's tensors keyed by their short names (`q_proj.weight`, `input_layernorm.weight`)."""
    prefix = f"model.layers.{i}."
    return {
        name[len(prefix):].removeprefix("self_attn.").removeprefix("mlp."): tensor
        for name, tensor in weights.items() if name.startswith(prefix)
    }

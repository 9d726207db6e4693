"""The Llama family (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5, Qwen3) in plain PyTorch.

One forward (forerun.models.batch.ForwardBatch) serves prompt chunks, autoregressive steps and
token-tree verification of many sequences at once: every row carries an explicit position, its K/V
are written into a shared KV store at an explicit slot, and it attends to its own sequence's slots.

On the CPU in float32 every row is computed by kernels whose arithmetic does not depend on the other
rows of the forward (forerun.kernels), so a sequence's output is the same alone or in any batch.
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
from forerun.models.batch import ForwardBatch, ForwardOutput


class Linear(nn.Module):
    """y = x W^T + b, with two faster CPU storages for W:

    - a oneDNN pre-packed float32 copy: on AVX2 CPUs it runs a 1..32-row GEMM at close to memory
      bandwidth, while the default BLAS path is 1.5-2x slower for the 2..16 rows a draft tree has;
    - GGUF-style blocks (q4 or q8, forerun.models.quant) run by a native kernel, 4.5 to 9 bits a weight:
      given as a QuantWeight (read from a GGUF's blocks) or quantized from the float weight (quantize).

    Both compute each output row independently of the other rows (the packed GEMM after one fix, below).
    """

    def __init__(self, weight: Tensor | quant.QuantWeight, bias: Tensor | None = None):
        super().__init__()
        blocks = isinstance(weight, quant.QuantWeight)
        self.weight = nn.Parameter(torch.empty(0) if blocks else weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.packed: Tensor | None = None
        self.quant: quant.QuantWeight | None = weight if blocks else None
        self.pack_tried = False

    def pack_for_cpu(self) -> bool:
        self.pack_tried = True
        if self.weight.device.type != "cpu" or self.weight.dtype != torch.float32 or self.quant is not None:
            return False
        try:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, None)
        except (RuntimeError, AttributeError):  # a torch build without oneDNN
            return False
        return True

    def quantize(self, kind: str) -> bool:
        """Replace the float weight by `kind` ("q4" or "q8") blocks; False if its shape does not allow it.
        Blocks given at construction are kept as they are."""
        if self.quant is not None:
            return True
        if self.weight.dtype != torch.float32 or not quant.quantizable(self.weight):
            return False
        self.quant = quant.QUANTIZERS[kind](self.weight.data)
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.packed = None
        return True

    def forward(self, x: Tensor) -> Tensor:
        if self.quant is not None:
            y = quant.linear(x, self.quant)
            return y if self.bias is None else y + self.bias
        if self.packed is None and not self.pack_tried and x.device.type == "cpu":
            self.pack_for_cpu()  # float32 on the CPU always runs packed: the row-independent path
        if self.packed is not None:
            if x.shape[0] == 1:
                # oneDNN runs one row through a GEMV whose sums (for some shapes, e.g. 1536 inputs) are
                # rounded differently from the GEMM it runs for two or more rows; a duplicated row keeps
                # a row's result independent of how many rows share the call.
                return torch.ops.mkldnn._linear_pointwise(x.expand(2, -1), self.packed, self.bias, "none", [], "")[:1]
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


class RopeTable:
    """cos and sin of every position's rotary angles, computed on the CPU in fixed chunks of positions
    as they are first needed and never recomputed, so a position's values never depend on which
    positions share a forward (a vectorized cos may round a tensor's last elements differently)."""

    CHUNK = 1024

    def __init__(self, inv_freq: Tensor):
        self.inv_freq = inv_freq.cpu()  # [head_dim / 2] float32
        self.cos = self.sin = self.inv_freq.new_zeros(0, 2 * inv_freq.shape[0])  # [positions, head_dim]

    def lookup(self, positions: Tensor, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """[R, head_dim] cos and sin at `positions`, contiguous, on `device`."""
        positions = positions.cpu()
        top = int(positions.max()) + 1
        while self.cos.shape[0] < top:
            first = self.cos.shape[0]
            pos = torch.arange(first, first + self.CHUNK, dtype=self.inv_freq.dtype)
            angles = pos[:, None] * self.inv_freq[None, :]
            angles = torch.cat((angles, angles), dim=-1)
            self.cos, self.sin = torch.cat([self.cos, angles.cos()]), torch.cat([self.sin, angles.sin()])
        return self.cos[positions].to(device, dtype), self.sin[positions].to(device, dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [R, heads, head_dim]; cos, sin: [R, 1, head_dim] (the half-split layout HF uses)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, args: ModelArgs, w: dict[str, Tensor]):
        super().__init__()
        self.args = args
        qkv_bias = torch.cat([w["q_proj.bias"], w["k_proj.bias"], w["v_proj.bias"]]) if args.attention_bias else None
        self.qkv = Linear(_fused(w, "q_proj", "k_proj", "v_proj"), qkv_bias)
        self.o = Linear(w["o_proj.weight"], w.get("o_proj.bias"))
        self.gate_up = Linear(_fused(w, "gate_proj", "up_proj"))
        self.down = Linear(w["down_proj.weight"])
        self.attn_norm = RMSNorm(w["input_layernorm.weight"], args.rms_norm_eps)
        self.mlp_norm = RMSNorm(w["post_attention_layernorm.weight"], args.rms_norm_eps)
        self.q_norm = RMSNorm(w["q_norm.weight"], args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(w["k_norm.weight"], args.rms_norm_eps) if args.qk_norm else None
        # What the native attention handles: head sizes its vector loops cover.
        self.fusable = args.head_dim % 8 == 0 and args.head_dim <= 256
        # bind_q4: what the layer's two native calls take besides the step's tensors (norm weights, eps,
        # the native handles of qkv, o, gate_up and down, heads, attention scale)
        self.q4_plan: tuple | None = None

    def bind_q4(self) -> None:
        """After quantization: run each layer as two native calls (attention half, MLP half), when all
        four projections are q4 blocks (a layer with q8 ones runs op by op)."""
        native = kernels.cpu_kernels()
        linears = (self.qkv, self.o, self.gate_up, self.down)
        if native is None or not self.fusable or self.q_norm is not None \
                or any(m.quant is None or m.quant.kind != "q4" or m.bias is not None for m in linears):
            return
        self.q4_plan = (self.attn_norm.weight, self.mlp_norm.weight, self.args.rms_norm_eps,
                        *(quant.packed_q4(m.quant) for m in linears), self.args.num_heads, self.args.head_dim ** -0.5)

    def forward(self, x: Tensor, layer: int, kv: KVCache, batch: ForwardBatch, cos: Tensor, sin: Tensor) -> Tensor:
        if self.q4_plan is not None:
            return self._q4_layer(x, layer, kv, batch, cos, sin)
        qkv = self._qk_normed(self.qkv(self.attn_norm(x)))
        native = kernels.for_tensor(x) if self.fusable else None
        if native is not None:
            out = native.batch_attention(qkv, cos, sin, kv.k[layer], kv.v[layer], batch.native(),
                                         self.args.num_heads, self.args.head_dim ** -0.5)
        else:
            out = self._attention(qkv, layer, kv, batch, cos, sin)
        x = x + self.o(out)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def _q4_layer(self, x: Tensor, layer: int, kv: KVCache, batch: ForwardBatch, cos: Tensor, sin: Tensor) -> Tensor:
        return _q4_run(kernels.cpu_kernels(), self.q4_plan, x.contiguous(), kv.k[layer], kv.v[layer], batch.native(),
                       cos, sin)

    def _qk_normed(self, qkv: Tensor) -> Tensor:
        """qkv with Qwen3's per-head RMSNorm applied to q and k (unchanged for other models)."""
        if self.q_norm is None:
            return qkv
        a, R = self.args, qkv.shape[0]
        q, k, v = qkv.split([a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim], -1)
        q = self.q_norm(q.reshape(R * a.num_heads, a.head_dim).contiguous()).view(R, -1)
        k = self.k_norm(k.reshape(R * a.num_kv_heads, a.head_dim).contiguous()).view(R, -1)
        return torch.cat([q, k, v], dim=-1)

    def _attention(self, qkv: Tensor, layer: int, kv: KVCache, batch: ForwardBatch, cos: Tensor,
                   sin: Tensor) -> Tensor:  # [R, heads * head_dim]
        """PyTorch attention (CUDA, half precision, or no native kernels): each sequence's rows run
        SDPA over its keys gathered from the store."""
        a, R = self.args, qkv.shape[0]
        q_size, kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
        qk = apply_rope(qk.reshape(R, a.num_heads + a.num_kv_heads, a.head_dim), cos[:, None], sin[:, None])
        q, k = qk.split([a.num_heads, a.num_kv_heads], dim=1)
        slots = batch.write_slots.to(qkv.device)
        kv.k[layer].index_copy_(1, slots, k.transpose(0, 1).to(kv.k.dtype))
        kv.v[layer].index_copy_(1, slots, v.reshape(R, a.num_kv_heads, a.head_dim).transpose(0, 1).to(kv.v.dtype))
        out = torch.empty(R, a.num_heads, a.head_dim, dtype=qkv.dtype, device=qkv.device)
        for b in range(batch.sequences):
            rows, keys = batch.rows_of(b), batch.keys_of(b).to(qkv.device)
            causal_prompt = batch.masks[b] is None and keys.shape[0] == rows.stop - rows.start
            mask = None if causal_prompt else batch.full_mask(b).to(qkv.device)
            out[rows] = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None], kv.k[layer][:, keys][None], kv.v[layer][:, keys][None],
                attn_mask=mask, is_causal=causal_prompt and rows.stop - rows.start > 1,
                enable_gqa=a.num_heads != a.num_kv_heads,
            )[0].transpose(0, 1)
        return out.reshape(R, q_size)


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

    @property
    def kv_dtype(self) -> torch.dtype:
        """What its KV cache stores: the model's dtype, unless a subclass stores it narrower."""
        return self.dtype


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
        head = weights.get("lm_head.weight")
        if args.tie_word_embeddings and not isinstance(head, quant.QuantWeight):  # GGUF blocks of a tied head
            head = weights["model.embed_tokens.weight"]
        self.head = Linear(head)
        self.rope = RopeTable(rope_frequencies(args))

    @property
    def quantization(self) -> str | None:
        """How the weights are stored when not as plain floats, for labels; None otherwise."""
        if self.head.quant is None:
            return None
        kinds = sorted({m.quant.kind for layer in self.layers for m in layer.modules() if isinstance(m, Linear)})
        return f"{'/'.join(kinds)} blocks, {self.head.quant.kind} head"

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
        (a Q4_1/Q8_0 GGUF such as the embedded SmolLM2 is recovered exactly), except those given as
        blocks (read from a GGUF), which stay as they are. The embedding table stays float: a step
        reads only one row of it."""
        linears = [m for layer in self.layers for m in layer.modules() if isinstance(m, Linear)]
        if not (all([m.quantize("q4") for m in linears]) and self.head.quantize("q8")):
            return False
        for layer in self.layers:
            layer.bind_q4()
        return True

    def new_cache(self, slots: int) -> KVCache:
        a = self.args
        return KVCache(a.num_layers, a.num_kv_heads, a.head_dim, slots, self.kv_dtype, self.device)

    @property
    def kv_dtype(self) -> torch.dtype:
        """float16 where every layer runs as native q4 calls (their attention reads float16 keys and
        values exactly, and a decoding step at long context reads half the bytes; llama.cpp's default
        KV type too); otherwise the model's dtype."""
        if all(layer.q4_plan is not None for layer in self.layers):
            return torch.float16
        return super().kv_dtype

    def forward(
        self,
        batch: ForwardBatch,
        kv: KVCache,  # the store every row's K/V go into, at batch.write_slots
        num_layers: int | None = None,  # run only the first k layers (self-speculation)
        keep_layers: tuple[int, ...] = (),  # also return the residual stream after these numbers of layers
    ) -> ForwardOutput:
        x = F.embedding(batch.tokens.to(self.device), self.embed)
        cos, sin = self.rope.lookup(batch.positions, x.dtype, x.device)
        if self.args.sliding_window is not None:
            batch = batch.windowed(self.args.sliding_window)
        kept = {}
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        plans = [layer.q4_plan for layer in layers]
        if all(plan is not None for plan in plans):
            # q4 on native kernels: two calls a layer and nothing else (a decoding step's Python overhead)
            native, nb, x = kernels.cpu_kernels(), batch.native(), x.contiguous()
            for i, (plan, k, v) in enumerate(zip(plans, kv.k, kv.v)):
                x = _q4_run(native, plan, x, k, v, nb, cos, sin)
                if i + 1 in keep_layers:
                    kept[i + 1] = x
        else:
            for i, layer in enumerate(layers):
                x = layer(x, i, kv, batch, cos, sin)
                if i + 1 in keep_layers:
                    kept[i + 1] = x
        hidden = self.norm(x)
        rows = hidden[batch.logit_rows.to(self.device)]
        logits = self.head(rows.to(self.head.weight.dtype) if self.head.quant is None else rows).float()
        return ForwardOutput(logits=logits, hidden=hidden, layers=kept)


def _q4_run(native, plan: tuple, x: Tensor, k: Tensor, v: Tensor, nb, cos: Tensor, sin: Tensor) -> Tensor:
    """One q4 layer as its two native calls: x + attention, then x + MLP (Block.bind_q4's plan)."""
    attn_norm, mlp_norm, eps, qkv, o, gate_up, down, heads, scale = plan
    x = native.q4_attention_block(x, attn_norm, eps, qkv, o, cos, sin, k, v, nb, heads, scale)
    return native.q4_mlp_block(x, mlp_norm, eps, gate_up, down)


def _fused(w: dict[str, Tensor | quant.QuantWeight], *names: str) -> Tensor | quant.QuantWeight:
    """The projections `names` (q, k, v; gate, up) stacked by rows into one: blocks if all of them are
    blocks, else float (blocks dequantized)."""
    parts = [w[f"{name}.weight"] for name in names]
    if all(isinstance(p, quant.QuantWeight) for p in parts):
        return quant.concat(parts)
    return torch.cat([quant.dequantize(p) if isinstance(p, quant.QuantWeight) else p for p in parts])


def _layer_weights(weights: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    """Layer i's tensors keyed by their short names (`q_proj.weight`, `input_layernorm.weight`)."""
    prefix = f"model.layers.{i}."
    return {
        name[len(prefix):].removeprefix("self_attn.").removeprefix("mlp."): tensor
        for name, tensor in weights.items() if name.startswith(prefix)
    }

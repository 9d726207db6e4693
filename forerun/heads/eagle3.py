"""EAGLE-3 draft heads (Li et al. 2025, arXiv 2503.01840), in the checkpoint layout of vLLM's
`speculators` (Eagle3Speculator), so a head trained here loads in vLLM and a speculators head loads here.

A head drafts from the target's own features. At target position i it reads f_i, the target's residual
streams after three of its layers (low, middle, high; concatenated, then projected by `fc`), and the
embedding of the next token x_{i+1}; one decoder layer whose attention takes [norm(embedding); norm(hidden)]
(2 x hidden wide) runs over those rows with a KV cache of its own, and its output through `norm` and
`lm_head` scores the token after: x_{i+2}, over a reduced draft vocabulary (`d2t` maps draft ids to target
ids). To draft further it feeds its own output hidden state back in place of f, with the token it drafted.

Layout (safetensors names, as speculators saves them):
    fc.weight                     [D, 3 * D_target]
    layers.0.input_layernorm      the embedding's norm       layers.0.hidden_norm   the hidden state's norm
    layers.0.self_attn.{q,k,v}_proj [*, 2 * D]               layers.0.self_attn.o_proj
    layers.0.post_attention_layernorm, layers.0.mlp.{gate,up,down}_proj
    norm.weight, lm_head.weight   [V_draft, D]
    d2t [V_draft] (target id - draft id), t2d [V_target] bool
    embed_tokens.weight           optional: absent, the target's embedding is used (as vLLM does)
The original EAGLE-3 release names the layer `midlayer.*` and keeps the config in a Llama config
(`LlamaForCausalLMEagle3`); load_head reads both.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forerun.kernels import cpu_kernels
from forerun.models import quant
from forerun.models.llama import apply_rope

SPECULATORS_VERSION = "0.9.0"  # the speculators release whose config classes the saved config.json follows


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int  # D, the head's width (the target's in every published head)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int  # the target's
    draft_vocab_size: int
    aux_layers: tuple[int, ...]  # the target's residual streams after these numbers of layers, concatenated
    target_hidden_size: int | None = None  # D_target when it differs from D
    norm_before_residual: bool = False  # the residual after attention starts from norm(hidden), not hidden
    max_position_embeddings: int = 8192
    verifier: str | None = None  # the target this head was trained for (a name or path, for people)
    verifier_architecture: str = "LlamaForCausalLM"
    extra: dict = field(default_factory=dict, compare=False)  # further speculators keys, kept on save

    @property
    def feature_size(self) -> int:
        return len(self.aux_layers) * (self.target_hidden_size or self.hidden_size)

    @staticmethod
    def for_target(args, aux_layers: tuple[int, ...], draft_vocab_size: int, verifier: str | None,
                   norm_before_residual: bool = False) -> Eagle3Config:
        """A head as wide as the target, its one layer shaped like the target's layers."""
        return Eagle3Config(hidden_size=args.hidden_size, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                            head_dim=args.head_dim, intermediate_size=args.intermediate_size,
                            rms_norm_eps=args.rms_norm_eps, rope_theta=args.rope_theta, vocab_size=args.vocab_size,
                            draft_vocab_size=draft_vocab_size, aux_layers=tuple(aux_layers),
                            max_position_embeddings=args.max_position_embeddings, verifier=verifier,
                            norm_before_residual=norm_before_residual)

    # -- config.json ----------------------------------------------------------------------------------

    def to_speculators(self) -> dict:
        """config.json as speculators' Eagle3SpeculatorConfig writes it (and vLLM reads it)."""
        layer = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": self.hidden_size,
                 "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                 "head_dim": self.head_dim, "intermediate_size": self.intermediate_size,
                 "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "vocab_size": self.vocab_size,
                 "max_position_embeddings": self.max_position_embeddings, "num_hidden_layers": 1,
                 "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}
        out = {
            **self.extra,
            "architectures": ["Eagle3Speculator"],
            "speculators_model_type": "eagle3",
            "speculators_version": SPECULATORS_VERSION,
            "draft_vocab_size": self.draft_vocab_size,
            "norm_before_residual": self.norm_before_residual,
            "target_hidden_size": self.target_hidden_size,
            "eagle_aux_hidden_state_layer_ids": list(self.aux_layers),
            "transformer_layer_config": layer,
            "speculators_config": {
                "algorithm": "eagle3",
                "default_proposal_method": "greedy",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 4,
                                      "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                "verifier": {"name_or_path": self.verifier, "architectures": [self.verifier_architecture]},
            },
        }
        return out

    @staticmethod
    def from_dict(raw: dict, target_layers: int | None = None) -> Eagle3Config:
        """From a speculators config.json, or the original EAGLE-3 one (a Llama config with
        draft_vocab_size); target_layers fills in the aux layers a config leaves to the default."""
        if "transformer_layer_config" in raw:
            layer, known = raw["transformer_layer_config"], {
                "architectures", "speculators_model_type", "speculators_version", "draft_vocab_size",
                "norm_before_residual", "target_hidden_size", "eagle_aux_hidden_state_layer_ids",
                "transformer_layer_config", "speculators_config"}
            if raw.get("speculators_model_type", "eagle3") != "eagle3":
                raise ValueError(f"not an EAGLE-3 head: speculators_model_type {raw.get('speculators_model_type')!r}")
            for flag in ("norm_before_fc", "fc_norm", "norm_output"):
                if raw.get(flag):
                    raise ValueError(f"this head uses speculators' {flag}, which forerun does not implement yet")
            verifier = raw.get("speculators_config", {}).get("verifier", {})
            aux = raw.get("eagle_aux_hidden_state_layer_ids")
            norm_before_residual = bool(raw.get("norm_before_residual", False))
            extra = {k: v for k, v in raw.items() if k not in known}
        else:  # the original release: one Llama config
            layer, aux, verifier, extra = raw, raw.get("eagle_aux_hidden_state_layer_ids"), {}, {}
            norm_before_residual = bool(raw.get("norm_before_residual", False))
        if not aux:
            if target_layers is None:
                raise ValueError("the head does not name its target layers and the target's depth is unknown")
            aux = [2, target_layers // 2, target_layers - 3]  # EAGLE-3's (and vLLM's) default choice
        heads = layer["num_attention_heads"]
        head_dim = layer.get("head_dim") or layer["hidden_size"] // heads
        return Eagle3Config(
            hidden_size=layer["hidden_size"], num_heads=heads, num_kv_heads=layer.get("num_key_value_heads", heads),
            head_dim=head_dim, intermediate_size=layer["intermediate_size"],
            rms_norm_eps=layer.get("rms_norm_eps", 1e-6), rope_theta=layer.get("rope_theta", 10000.0),
            vocab_size=layer["vocab_size"], draft_vocab_size=raw.get("draft_vocab_size") or layer["vocab_size"],
            aux_layers=tuple(aux), target_hidden_size=raw.get("target_hidden_size"),
            norm_before_residual=norm_before_residual,
            max_position_embeddings=layer.get("max_position_embeddings", 8192),
            verifier=verifier.get("name_or_path"), verifier_architecture=(verifier.get("architectures") or
                                                                          ["LlamaForCausalLM"])[0],
            extra=extra)


class HeadCache:
    """One sequence's keys and values in the head's single layer: committed rows, then (while a step
    drafts) the draft's rows, which truncate() drops. Grows by doubling.

    window > 0: a step's rows attend to the last `window` committed rows before them (and to the rows
    of the step), not to all of them; the one layer's keys and values of a row depend on that row
    alone, so older rows never need computing."""

    def __init__(self, kv_width: int, dtype: torch.dtype = torch.float32, capacity: int = 256, window: int = 0):
        self.k = torch.empty(capacity, kv_width, dtype=dtype)
        self.v = torch.empty(capacity, kv_width, dtype=dtype)
        self.positions = torch.empty(capacity, dtype=torch.long)
        self.length = 0
        self.window = window

    def copy(self) -> HeadCache:
        """A cache holding the same rows (a sampled sequence's siblings start from its prompt rows)."""
        out = HeadCache(self.k.shape[1], self.k.dtype, self.k.shape[0], self.window)
        out.append(self.k[:self.length], self.v[:self.length], self.positions[:self.length])
        return out

    def reserve(self, n: int) -> None:
        """Room for n more rows."""
        if self.length + n > self.k.shape[0]:
            grow = max(2 * self.k.shape[0], self.length + n)
            for name in ("k", "v", "positions"):
                old = getattr(self, name)
                new = old.new_empty((grow, *old.shape[1:]))
                new[:self.length] = old[:self.length]
                setattr(self, name, new)

    def append(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        n = k.shape[0]
        self.reserve(n)
        self.k[self.length:self.length + n] = k
        self.v[self.length:self.length + n] = v
        self.written(positions)

    def written(self, positions: Tensor) -> None:
        """The rows after the last, whose keys and values were written in place (the native layer), join."""
        n = positions.shape[0]
        self.positions[self.length:self.length + n] = positions
        self.length += n

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def keep_before(self, position: int) -> None:
        """Drop the rows at `position` and later (a recomputed stretch replaces them)."""
        self.length = int((self.positions[:self.length] < position).sum())


@dataclass(frozen=True, slots=True)
class HeadRows:
    """Rows of one sequence for a head step (see Eagle3Head.step)."""

    cache: HeadCache
    tokens: Tensor  # [T] long
    hidden: Tensor  # [T, D]
    positions: Tensor  # [T] long
    mask: Tensor | None = None
    visible: int | None = None


class Eagle3Head(nn.Module):
    def __init__(self, config: Eagle3Config, embed: Tensor):
        super().__init__()
        c = self.config = config
        D, q_out, kv_out = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.fc = nn.Linear(c.feature_size, D, bias=False)
        self.input_layernorm = nn.RMSNorm(D, eps=c.rms_norm_eps)
        self.hidden_norm = nn.RMSNorm(D, eps=c.rms_norm_eps)
        self.q_proj = nn.Linear(2 * D, q_out, bias=False)
        self.k_proj = nn.Linear(2 * D, kv_out, bias=False)
        self.v_proj = nn.Linear(2 * D, kv_out, bias=False)
        self.o_proj = nn.Linear(q_out, D, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(D, eps=c.rms_norm_eps)
        self.gate_proj = nn.Linear(D, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(D, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, D, bias=False)
        self.norm = nn.RMSNorm(D, eps=c.rms_norm_eps)
        self.lm_head = nn.Linear(D, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(c.vocab_size, dtype=torch.bool))
        self.embed = embed  # [V, D] the target's (or the checkpoint's) token embedding, never trained
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    # -- vocabulary -----------------------------------------------------------------------------------

    @property
    def draft_ids(self) -> Tensor:
        """[V_draft] the target id of each draft id."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def set_vocabulary(self, target_ids: Tensor) -> None:
        """Draft id j stands for target id target_ids[j] (sorted ascending, as speculators keeps them)."""
        target_ids = target_ids.sort().values
        self.d2t.copy_(target_ids - torch.arange(len(target_ids)))
        self.t2d.zero_()
        self.t2d[target_ids] = True

    # -- the layer ------------------------------------------------------------------------------------

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)  # [..., 1, head_dim]

    def project(self, tokens: Tensor, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The layer up to attention: q, k, v ([..., heads, head_dim], rotated) and the residual."""
        c = self.config
        embeds = self.input_layernorm(F.embedding(tokens, self.embed).to(hidden.dtype))
        normed = self.hidden_norm(hidden)
        residual = normed if c.norm_before_residual else hidden
        x = torch.cat([embeds, normed], dim=-1)
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(*shape, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(*shape, c.num_kv_heads, c.head_dim)
        cos, sin = self.rope(positions)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, residual

    def layer_out(self, attended: Tensor, residual: Tensor) -> Tensor:
        x = residual + self.o_proj(attended)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.norm(hidden))

    # -- inference ------------------------------------------------------------------------------------

    def step(self, cache: HeadCache, tokens: Tensor, hidden: Tensor, positions: Tensor,
             mask: Tensor | None = None, visible: int | None = None) -> tuple[Tensor, Tensor]:
        """Run T rows of one sequence ([T] tokens, [T, D] hidden inputs: fc(features) or the head's own
        output) after the rows in `cache`, appending their keys and values. Every row sees the cache's
        first `visible` rows (default: all of them); mask [T, L - visible + T] bool says which of the
        later cache rows and of these T rows each sees (default: all earlier ones and causal among the
        T). Returns the output hidden states [T, D] and draft-vocabulary logits [T, V_draft]."""
        return self.step_batch([HeadRows(cache, tokens, hidden, positions, mask, visible)])[0]

    def step_batch(self, items: list[HeadRows], last_only: bool = False) -> list[tuple[Tensor, Tensor]]:
        """step() for the rows of several sequences at once: the projections, norms and draft logits
        run over all their rows together (a drafting step reads every weight of the head, so a batch
        reads them once), attention per sequence over its own cache. last_only: the output and logits of
        each item's last row only ([1, D], [1, V_draft]), where the rows before it are context
        (committed rows caught up): they need their keys and values alone (the native layer computes
        nothing more for them), and a row's result never depends on its batch."""
        tokens = torch.cat([it.tokens for it in items])
        hidden = torch.cat([it.hidden for it in items])
        positions = torch.cat([it.positions for it in items])
        if getattr(self, "native", None) is not None:
            return self._native_step(items, tokens, hidden, positions, last_only)
        q, k, v, residual = self._step_layer(tokens, hidden, positions)
        attended, start = [], 0
        for it in items:
            rows = slice(start, start + it.tokens.shape[0])
            attended.append(self._attend(it, q[rows], k[rows], v[rows]))
            start = rows.stop
        out = self._step_out(torch.cat(attended), residual)
        sizes = [it.tokens.shape[0] for it in items]
        if last_only:
            last = torch.tensor(sizes).cumsum(0) - 1
            return [(out[i][None], lg[None]) for i, lg in zip(last.tolist(), self._step_logits(out[last]))]
        return list(zip(out.split(sizes), self._step_logits(out).split(sizes)))

    def _native_step(self, items: list[HeadRows], tokens: Tensor, hidden: Tensor, positions: Tensor,
                     last_only: bool) -> list[tuple[Tensor, Tensor]]:
        """step_batch as one native call (pack_for_cpu built it): the same layer, its keys and values
        written into each sequence's cache in place."""
        info, masks, offset = [], [], 0
        for it in items:
            cache, T = it.cache, it.tokens.shape[0]
            before = cache.length
            visible = before if it.visible is None else it.visible
            cache.reserve(T)
            at = -1
            if it.mask is not None:
                masks.append(it.mask.reshape(-1))
                at, offset = offset, offset + it.mask.numel()
            info.append((T, before, visible, max(0, visible - cache.window) if cache.window else 0, at))
        sizes = [it.tokens.shape[0] for it in items]
        ends = torch.tensor(sizes).cumsum(0)
        out, logits = cpu_kernels().eagle_layer(
            self.native, tokens.long().contiguous(), hidden.float().contiguous(), positions.long().contiguous(),
            [it.cache.k for it in items], [it.cache.v for it in items], torch.tensor(info, dtype=torch.long),
            torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool),
            ends - 1 if last_only else torch.arange(int(ends[-1])))
        for it in items:
            it.cache.written(it.positions)
        if last_only:
            return [(o[None], lg[None]) for o, lg in zip(out, logits)]
        return list(zip(out.split(sizes), logits.split(sizes)))

    def _attend(self, it: HeadRows, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One sequence's T rows ([T, heads, head_dim] rotated q, k, v) attending over its cache, which
        they join: [T, heads * head_dim]."""
        c, cache = self.config, it.cache
        before = cache.length
        visible = before if it.visible is None else it.visible
        first = max(0, visible - cache.window) if cache.window else 0  # the oldest row the step sees
        cache.append(k.reshape(k.shape[0], -1), v.reshape(v.shape[0], -1), it.positions)
        keys = cache.k[first:cache.length].view(-1, c.num_kv_heads, c.head_dim).transpose(0, 1)  # [KV, L, hd]
        values = cache.v[first:cache.length].view(-1, c.num_kv_heads, c.head_dim).transpose(0, 1)
        T, group = q.shape[0], c.num_heads // c.num_kv_heads
        # each kv head's queries as one block of group * T rows (SDPA's grouped path copies the keys)
        q = q.reshape(T, c.num_kv_heads, group, c.head_dim).permute(1, 2, 0, 3).reshape(c.num_kv_heads, group * T, -1)
        scores = (q @ keys.transpose(1, 2)) * (1.0 / math.sqrt(c.head_dim))  # [KV, group * T, L]
        mask = it.mask
        if mask is not None or T > 1:
            if mask is None:
                mask = torch.cat([torch.ones(T, before - visible, dtype=torch.bool),
                                  torch.ones(T, T, dtype=torch.bool).tril_()], dim=1)
            full = torch.cat([torch.ones(T, visible - first, dtype=torch.bool), mask], dim=1).repeat(group, 1)
            scores = scores.masked_fill(~full, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ values  # [KV, group * T, hd]
        return out.view(c.num_kv_heads, group, T, c.head_dim).permute(2, 0, 1, 3).reshape(T, -1)

    def pack_for_cpu(self, kind: str | None = "q8") -> None:
        """Inference copies of the projections on forerun's CPU kernels (forerun.models.llama.Linear):
        q, k and v fused, gate and up fused, as `kind` ("q8": GGUF-style 8-bit blocks, a quarter of
        float32's bytes; None: pre-packed float32). A drafting step reads every weight of the head for
        one or a few rows, so its time is the bytes it reads. step() uses them from then on; training
        never does. Drafts change by rounding only, outputs never."""
        from forerun.models.llama import Linear, RMSNorm

        def linear(*modules: nn.Linear) -> Linear:
            out = Linear(torch.cat([m.weight.detach().float() for m in modules]).contiguous())
            if kind is not None:
                out.quantize(kind)  # a shape the blocks do not fit stays float
            return out

        self.fast = {"fc": linear(self.fc), "qkv": linear(self.q_proj, self.k_proj, self.v_proj),
                     "o": linear(self.o_proj), "gate_up": linear(self.gate_proj, self.up_proj),
                     "down": linear(self.down_proj), "lm_head": linear(self.lm_head)}
        for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm", "norm"):  # the native kernel
            module = getattr(self, name)
            self.fast[name] = RMSNorm(module.weight.detach().float().clone(), module.eps)
        # the native layer takes q apart from k and v: rows caught up need no query
        self.native = self._native_layer(kind, linear(self.q_proj), linear(self.k_proj, self.v_proj))

    def unpacked_copy(self) -> Eagle3Head:
        """A deep copy without the inference copies pack_for_cpu made (the native kernels' objects do
        not copy): a head to train, or to pack again."""
        kept = {name: self.__dict__.pop(name) for name in ("fast", "native") if name in self.__dict__}
        try:
            return copy.deepcopy(self)
        finally:
            self.__dict__.update(kept)

    def _native_layer(self, kind: str | None, q, kv):
        """The layer as one native call (cpu_kernels().eagle_layer), where the kernels are built, every
        projection is in blocks (q and kv: the query's and the keys' and values' Linear) and the shapes
        fit the kernel's vectors; None otherwise (step_batch then runs it op by op)."""
        kernels = cpu_kernels()
        c = self.config
        fits = c.head_dim % 8 == 0 and c.head_dim <= 256 and c.hidden_size % 8 == 0  # the kernel's vector widths
        if kernels is None or kind is None or self.fc.weight.dtype != torch.float32 or not fits:
            return None
        blocks = [q.quant, kv.quant] + [self.fast[name].quant for name in ("o", "gate_up", "down", "lm_head")]
        if any(w is None for w in blocks):  # a shape the blocks do not fit
            return None
        linears = [kernels.head_linear(quant.packed_q4(w) if w.kind == "q4" else quant.packed_q8(w)) for w in blocks]
        norms = [self.fast[n].weight.detach().contiguous()
                 for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm", "norm")]
        return kernels.EagleLayer(self.embed.float().contiguous(), *norms, self.inv_freq.contiguous(),
                                  *linears, c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps,
                                  c.norm_before_residual)

    def features(self, features: Tensor) -> Tensor:
        """fc over the target's concatenated features: the hidden input of committed rows."""
        fast = getattr(self, "fast", None)
        return self.fc(features) if fast is None else fast["fc"](features.float().contiguous())

    def _step_layer(self, tokens: Tensor, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        fast = getattr(self, "fast", None)
        if fast is None:
            return self.project(tokens, hidden, positions)
        c = self.config
        embeds = fast["input_layernorm"](F.embedding(tokens, self.embed).contiguous())
        normed = fast["hidden_norm"](hidden.contiguous())
        residual = normed if c.norm_before_residual else hidden
        qkv = fast["qkv"](torch.cat([embeds, normed], dim=-1))
        q, k, v = qkv.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], -1)
        T = tokens.shape[0]
        cos, sin = self.rope(positions)
        q = apply_rope(q.view(T, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(k.view(T, c.num_kv_heads, c.head_dim), cos, sin)
        return q, k, v.view(T, c.num_kv_heads, c.head_dim), residual

    def _step_out(self, attended: Tensor, residual: Tensor) -> Tensor:
        fast = getattr(self, "fast", None)
        if fast is None:
            return self.layer_out(attended, residual)
        x = residual + fast["o"](attended.contiguous())
        gate, up = fast["gate_up"](fast["post_attention_layernorm"](x)).chunk(2, dim=-1)
        return x + fast["down"]((F.silu(gate) * up).contiguous())

    def _step_logits(self, hidden: Tensor) -> Tensor:
        fast = getattr(self, "fast", None)
        return self.logits(hidden) if fast is None else fast["lm_head"](fast["norm"](hidden.contiguous()))

    def new_cache(self, window: int = 0) -> HeadCache:
        return HeadCache(self.config.num_kv_heads * self.config.head_dim, self.fc.weight.dtype, window=window)

    # -- training: a whole sequence, unrolled over its own predictions (training-time test) -------------

    def unrolled(self, features: Tensor, tokens: Tensor, positions: Tensor, valid: Tensor, steps: int,
                 active: Tensor | None = None) -> tuple[list[Tensor], Tensor, Tensor]:
        """The output hidden states of `steps` unrolled drafting steps over padded rows (logits() scores
        them), computed at the `active` rows only.

        features [B, T, F] the target's features f_i; tokens [B, T + steps] the tokens x_{i+1}, x_{i+2}, ...
        (teacher forced, as speculators does: a draft only matters where its earlier tokens were right);
        positions [B, T]; valid [B, T] bool (padding false); active [B, T] bool, the rows whose drafts are
        scored (default: the valid ones); the others only lend their keys. Step k's row i drafts x_{i+k+2}
        from the head's own step k - 1 output at row i and sees the target's rows <= i (step 0's keys) plus
        its own earlier steps' rows at i: exactly what it sees when drafting k + 1 tokens past a root at
        i + 1. Returns ([B, A, D] per step, index [B, A] of the active rows, index_valid [B, A])."""
        c = self.config
        B, T = features.shape[:2]
        active = valid if active is None else active & valid
        A = max(int(active.sum(1).max()), 1)
        order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :A]  # active rows first, in order
        index_valid = torch.gather(active, 1, order)
        index = torch.where(index_valid, order, torch.zeros_like(order))
        causal = torch.ones(T, T, dtype=torch.bool, device=features.device).tril_()
        allowed = torch.gather(causal[None].expand(B, T, T) & valid[:, None, :], 1, index[:, :, None].expand(B, A, T))
        scale = 1.0 / math.sqrt(c.head_dim)
        group = c.num_heads // c.num_kv_heads

        def rows(t: Tensor, k: int = 0) -> Tensor:  # [B, T + ..., *] -> the active rows, shifted by k
            return torch.gather(t, 1, (index + k).view(B, A, *([1] * (t.dim() - 2))).expand(B, A, *t.shape[2:]))

        hidden = self.fc(features)
        _, key0, value0, _ = self.project(tokens[:, :T], hidden, positions)  # every row's keys
        keys0 = key0.repeat_interleave(group, dim=2).transpose(1, 2)  # [B, H, T, hd]
        values0 = value0.repeat_interleave(group, dim=2).transpose(1, 2)
        hidden = rows(hidden)
        keys, values, out = [], [], []
        for k in range(steps):
            q, key, value, residual = self.project(rows(tokens, k), hidden, rows(positions) + k)
            q = q.transpose(1, 2)  # [B, H, A, hd]
            if k > 0:
                keys.append(key.repeat_interleave(group, dim=2).transpose(1, 2))
                values.append(value.repeat_interleave(group, dim=2).transpose(1, 2))
            scores = (q @ keys0.transpose(-1, -2)) * scale  # [B, H, A, T]
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
            own = [(q * kk).sum(-1, keepdim=True) * scale for kk in keys]  # [B, H, A, 1] each
            probs = torch.softmax(torch.cat([scores, *own], dim=-1), dim=-1)
            attended = probs[..., :T] @ values0
            for j, vv in enumerate(values):
                attended = attended + probs[..., T + j:T + j + 1] * vv
            hidden = self.layer_out(attended.transpose(1, 2).reshape(B, A, -1), residual)
            out.append(hidden)
        return out, index, index_valid


# -- files ------------------------------------------------------------------------------------------

HEAD_TENSORS = {  # our attribute -> speculators' name (the original release puts "midlayer." for "layers.0.")
    "fc.weight": "fc.weight",
    "input_layernorm.weight": "layers.0.input_layernorm.weight",
    "hidden_norm.weight": "layers.0.hidden_norm.weight",
    "q_proj.weight": "layers.0.self_attn.q_proj.weight",
    "k_proj.weight": "layers.0.self_attn.k_proj.weight",
    "v_proj.weight": "layers.0.self_attn.v_proj.weight",
    "o_proj.weight": "layers.0.self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "layers.0.post_attention_layernorm.weight",
    "gate_proj.weight": "layers.0.mlp.gate_proj.weight",
    "up_proj.weight": "layers.0.mlp.up_proj.weight",
    "down_proj.weight": "layers.0.mlp.down_proj.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def save_head(head: Eagle3Head, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """config.json and model.safetensors in speculators' layout (floats as `dtype`). bfloat16, not
    float16: fc's weights for the target's outlier dimensions (values near 1e4) are near 1e-6, which
    float16 flushes to subnormals; bfloat16 keeps float32's range."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = head.state_dict()
    tensors = {name: state[ours].detach().to(dtype).contiguous() for ours, name in HEAD_TENSORS.items()}
    tensors["d2t"] = head.d2t.clone()
    tensors["t2d"] = head.t2d.clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(head.config.to_speculators(), indent=2) + "\n")


def load_head(folder: str | Path, target) -> Eagle3Head:
    """A head from a speculators or original EAGLE-3 folder, checked against the target (a Runtime):
    every error names what does not fit."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json (expected an EAGLE-3 head folder)")
    weights_path = next((p for p in (folder / "model.safetensors", folder / "pytorch_model.bin") if p.is_file()), None)
    if weights_path is None:
        raise ValueError(f"{folder}: no model.safetensors")
    args = target.model.args
    try:
        config = Eagle3Config.from_dict(json.loads((folder / "config.json").read_text()), args.num_layers)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}/config.json is not an EAGLE-3 config: {e!r}") from e
    raw = load_file(str(weights_path)) if weights_path.suffix == ".safetensors" else torch.load(weights_path)
    raw = {name.replace("midlayer.", "layers.0.").removeprefix("model."): t for name, t in raw.items()}
    problems = []
    if config.vocab_size != args.vocab_size:
        problems.append(f"its vocabulary has {config.vocab_size} tokens, the target's {args.vocab_size}")
    if (config.target_hidden_size or config.hidden_size) != args.hidden_size:
        problems.append(f"it reads features {config.target_hidden_size or config.hidden_size} wide, the target's "
                        f"hidden size is {args.hidden_size}")
    if max(config.aux_layers) > args.num_layers or min(config.aux_layers) < 0:
        problems.append(f"it reads layers {list(config.aux_layers)}, the target has {args.num_layers}")
    if problems:
        raise ValueError(f"{folder}: this head does not fit the target: " + "; ".join(problems))
    embed = raw.pop("embed_tokens.weight", None)
    if embed is not None and embed.shape != (args.vocab_size, config.hidden_size):
        raise ValueError(f"{folder}: embed_tokens.weight has shape {tuple(embed.shape)}")
    if embed is None:
        if config.hidden_size != args.hidden_size:
            raise ValueError(f"{folder}: the head is {config.hidden_size} wide and carries no embedding")
        embed = target.model.embed.detach()
    head = Eagle3Head(config, embed.float())
    state = {}
    expected = head.state_dict()
    for ours, name in HEAD_TENSORS.items():
        if name not in raw:
            raise ValueError(f"{folder}: missing tensor {name}")
        if tuple(raw[name].shape) != tuple(expected[ours].shape):
            raise ValueError(f"{folder}: {name} has shape {tuple(raw[name].shape)}, expected {tuple(expected[ours].shape)}"
                             " for this config")
        state[ours] = raw[name].float()
    if config.draft_vocab_size != config.vocab_size:
        for name, size in (("d2t", config.draft_vocab_size), ("t2d", config.vocab_size)):
            if name not in raw or raw[name].shape != (size,):
                raise ValueError(f"{folder}: {name} missing or not of shape ({size},)")
        ids = torch.arange(config.draft_vocab_size) + raw["d2t"].long()
        if int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size or not bool(raw["t2d"].bool()[ids].all()) \
                or int(raw["t2d"].bool().sum()) != config.draft_vocab_size:
            raise ValueError(f"{folder}: d2t and t2d do not describe the same {config.draft_vocab_size} target tokens")
        state["d2t"], state["t2d"] = raw["d2t"].long(), raw["t2d"].bool()
    else:
        state["d2t"], state["t2d"] = expected["d2t"], expected["t2d"]
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


"""Medusa heads (Cai et al. 2024, arXiv 2401.10774): K small heads on the target's final hidden state.

Head k (k = 1..K) reads h_t, the target's final-normed hidden state at position t (the one whose own
LM head chose x_{t+1}), and scores x_{t+k+1}: `num_layers` residual blocks h <- h + SiLU(W h + b), then
an output projection. No head sees another's output or any drafted token, so all K run on one row at
once, and a tree of their candidates is the Cartesian product of each head's top choices.

The output projection covers a draft vocabulary (`draft_ids`, target ids, ascending): the full
vocabulary for FasterDecoding's heads, the tokens the target chooses most for the ones forerun trains
(vLLM's `token_map`), so a head for a 49k-token target stays a few MB.

Two checkpoint layouts load:
- vLLM's (`vllm/model_executor/models/medusa.py`; what save_head writes): config.json with `num_heads`,
  `num_hidden_layers`, `hidden_size`, `vocab_size`, `truncated_vocab_size` (and `medusa_fc_bias`,
  `original_lm_head`, `logit_scale`); tensors `blocks.{k}.layers.{l}.weight` [D, D] (`.bias` [D] with
  medusa_fc_bias), `lm_heads.{k}.weight` [V_draft, D] (only `lm_heads.0` with original_lm_head: one
  projection for every head) and `token_map` [V_draft] (the target id of each draft id) when the
  vocabulary is truncated. Heads are numbered from 0 in files: file head k is our head k + 1.
- FasterDecoding's (`medusa/model/medusa_model.py`): `medusa_lm_head.safetensors` or `.pt` holding
  the ModuleList `medusa_head`'s state, `{k}.{l}.linear.weight` and `.bias` for the blocks and
  `{k}.{num_layers}.weight` [V, D] over the whole vocabulary, with config.json's `medusa_num_heads`
  and `medusa_num_layers`.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VLLM_KNOWN = {"architectures", "model_type", "hidden_size", "vocab_size", "num_heads", "num_hidden_layers",
              "truncated_vocab_size", "medusa_fc_bias", "original_lm_head", "logit_scale",
              "base_model_name_or_path"}


@dataclass(frozen=True)
class MedusaConfig:
    hidden_size: int  # D: the target's
    vocab_size: int  # the target's
    num_heads: int  # K: head k drafts the token k + 1 positions past its hidden state's
    num_layers: int = 1  # residual blocks per head
    draft_vocab_size: int | None = None  # V_draft (None: the whole vocabulary)
    shared_lm_head: bool = False  # one output projection for every head (vLLM's original_lm_head)
    verifier: str | None = None  # the target it was trained for (a name or path, for people)
    extra: dict = field(default_factory=dict, compare=False)  # further config keys, kept on save

    @property
    def draft_size(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    def to_vllm(self) -> dict:
        """config.json as vLLM's MedusaConfig reads it."""
        return {**self.extra, "architectures": ["MedusaModel"], "model_type": "medusa",
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "num_heads": self.num_heads,
                "num_hidden_layers": self.num_layers, "truncated_vocab_size": self.draft_size,
                "medusa_fc_bias": True, "original_lm_head": self.shared_lm_head,
                "base_model_name_or_path": self.verifier}


class MedusaHead(nn.Module):
    def __init__(self, config: MedusaConfig):
        super().__init__()
        c = self.config = config
        K, L, D = c.num_heads, c.num_layers, c.hidden_size
        self.weight = nn.Parameter(torch.zeros(K, L, D, D))  # the blocks' W (zeros: the identity, as Medusa starts)
        self.bias = nn.Parameter(torch.zeros(K, L, D))
        self.lm_head = nn.Parameter(torch.zeros(1 if c.shared_lm_head else K, c.draft_size, D))
        self.register_buffer("draft_ids", torch.arange(c.draft_size))  # [V_draft] target id of each draft id
        self.fast: dict | None = None

    def forward(self, hidden: Tensor, heads: int | None = None) -> Tensor:
        """[N, D] final-normed hidden states -> [heads, N, V_draft] logits of the first `heads` heads
        (default: all K), as training computes them: every head in one batched product per layer."""
        heads = self.config.num_heads if heads is None else heads
        x = hidden.to(self.weight.dtype).expand(heads, *hidden.shape)
        for layer in range(self.config.num_layers):
            x = x + F.silu(torch.baddbmm(self.bias[:heads, layer, None], x, self.weight[:heads, layer].transpose(1, 2)))
        return x @ self._lm_heads(heads).transpose(1, 2)

    def each_head(self, hidden: Tensor) -> Iterator[Tensor]:
        """[N, D] -> the logits [N, V_draft] of head 1, 2, ... in turn, each computed only when asked
        for (a drafter stops asking where no path is worth drafting). On the CPU kernels once packed."""
        if self.fast is not None:
            yield from self._each_head_fast(hidden)
            return
        c = self.config
        for k in range(c.num_heads):
            x = hidden.to(self.weight.dtype)
            for layer in range(c.num_layers):
                x = x + F.silu(F.linear(x, self.weight[k, layer], self.bias[k, layer]))
            yield F.linear(x, self.lm_head[0 if c.shared_lm_head else k])

    def _lm_heads(self, heads: int) -> Tensor:
        return self.lm_head.expand(heads, -1, -1) if self.config.shared_lm_head else self.lm_head[:heads]

    def set_vocabulary(self, target_ids: Tensor) -> None:
        """Draft id j stands for target id target_ids[j] (sorted ascending)."""
        self.draft_ids.copy_(target_ids.sort().values)

    # -- inference on the CPU kernels -------------------------------------------------------------------

    def pack_for_cpu(self, kind: str | None = "q8") -> None:
        """Inference copies on forerun's CPU kernels (forerun.models.llama.Linear): every head's first
        block in one projection (they all read the same row), the other blocks and the output
        projections one each, as `kind` blocks ("q8": a quarter of float32's bytes; None: pre-packed
        float32). A drafting step reads every weight it uses for a row or a few, so its time is the
        bytes read. each_head() uses them from then on; forward() (training) never does. Drafts change by
        rounding only, outputs never."""
        from forerun.models.llama import Linear

        def linear(weight: Tensor, bias: Tensor | None = None) -> Linear:
            out = Linear(weight.detach().float().contiguous(), None if bias is None else bias.detach().float().clone())
            if kind is not None:
                out.quantize(kind)  # a shape the blocks do not fit stays float
            return out

        K, L = self.config.num_heads, self.config.num_layers
        first = linear(self.weight[:, 0].flatten(0, 1), self.bias[:, 0].flatten()) if L else None
        blocks = [[linear(self.weight[k, layer], self.bias[k, layer]) for layer in range(1, L)] for k in range(K)]
        lm_heads = [linear(self.lm_head[k]) for k in range(self.lm_head.shape[0])]
        self.fast = {"first": first, "blocks": blocks, "lm_heads": lm_heads}

    def _each_head_fast(self, hidden: Tensor) -> Iterator[Tensor]:
        h = hidden.float().contiguous()
        fast, c = self.fast, self.config
        first = fast["first"](h).view(h.shape[0], c.num_heads, -1) if fast["first"] is not None else None
        for k in range(c.num_heads):
            x = h if first is None else h + F.silu(first[:, k])
            for block in fast["blocks"][k]:
                x = x + F.silu(block(x.contiguous()))
            yield fast["lm_heads"][0 if c.shared_lm_head else k](x.contiguous())


def new_head(target, num_heads: int, draft_ids: Tensor, num_layers: int = 1, verifier: str | None = None
             ) -> MedusaHead:
    """A head as Medusa starts one: blocks at zero (each head begins as the identity), every output
    projection the target's LM head rows for the draft vocabulary."""
    args = target.model.args
    head = MedusaHead(MedusaConfig(hidden_size=args.hidden_size, vocab_size=args.vocab_size, num_heads=num_heads,
                                   num_layers=num_layers, draft_vocab_size=len(draft_ids), verifier=verifier))
    head.set_vocabulary(draft_ids)
    with torch.no_grad():
        head.lm_head.copy_(target_rows(target, head.draft_ids).expand_as(head.lm_head))
    return head


def target_rows(target, ids: Tensor) -> Tensor:
    """[len(ids), D] float32: the target's LM head rows for these target ids."""
    from forerun.models import quant

    head = target.model.head
    weight = head.weight if head.quant is None else quant.dequantize(head.quant)
    return weight.detach().float()[ids.to(weight.device)].cpu().clone()


# -- files ------------------------------------------------------------------------------------------

def save_head(head: MedusaHead, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """config.json and model.safetensors in vLLM's Medusa layout (floats as `dtype`), the one of the two
    that keeps a truncated vocabulary (`token_map`), so a head over 8k of 49k tokens is a sixth the size.
    The blocks' biases are saved with `medusa_fc_bias: true` (vLLM drops biases without it)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = head.config
    tensors = {}
    for k in range(c.num_heads):
        for layer in range(c.num_layers):
            tensors[f"blocks.{k}.layers.{layer}.weight"] = head.weight[k, layer].detach().to(dtype).contiguous()
            tensors[f"blocks.{k}.layers.{layer}.bias"] = head.bias[k, layer].detach().to(dtype).contiguous()
    for k in range(head.lm_head.shape[0]):
        tensors[f"lm_heads.{k}.weight"] = head.lm_head[k].detach().to(dtype).contiguous()
    if c.draft_size < c.vocab_size:
        tensors["token_map"] = head.draft_ids.clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(c.to_vllm(), indent=2) + "\n")


def load_head(folder: str | Path, target) -> MedusaHead:
    """A head from a vLLM or FasterDecoding Medusa folder, checked against the target (a Runtime):
    every error names what does not fit."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json (expected a Medusa head folder)")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder}/config.json is not JSON: {e}") from e
    tensors = _read_tensors(folder)
    tensors = {name.removeprefix("medusa_heads.").removeprefix("medusa_head."): t for name, t in tensors.items()}
    vllm = any(name.startswith("blocks.") for name in tensors)
    config = _vllm_config(raw, folder) if vllm else _fasterdecoding_config(raw, tensors, folder)
    args = target.model.args
    problems = []
    if config.vocab_size != args.vocab_size:
        problems.append(f"its vocabulary has {config.vocab_size} tokens, the target's {args.vocab_size}")
    if config.hidden_size != args.hidden_size:
        problems.append(f"it reads hidden states {config.hidden_size} wide, the target's hidden size is "
                        f"{args.hidden_size}")
    if problems:
        raise ValueError(f"{folder}: this head does not fit the target: " + "; ".join(problems))
    head = MedusaHead(config)
    state = _vllm_state(config, raw, tensors, folder) if vllm else _fasterdecoding_state(config, tensors, folder)
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    for name in ("model.safetensors", "medusa_lm_head.safetensors"):
        if (folder / name).is_file():
            return load_file(str(folder / name))
    for name in ("pytorch_model.bin", "medusa_lm_head.pt"):
        if (folder / name).is_file():
            return torch.load(folder / name, map_location="cpu", weights_only=True)
    raise ValueError(f"{folder}: no model.safetensors or medusa_lm_head.safetensors / .pt")


def _tensor(tensors: dict[str, Tensor], name: str, folder: Path, shape: tuple[int, ...] | None = None) -> Tensor:
    """tensors[name], as float32 if `shape` is given and after checking it."""
    if name not in tensors:
        raise ValueError(f"{folder}: missing tensor {name}")
    if shape is None:
        return tensors[name]
    if tuple(tensors[name].shape) != shape:
        raise ValueError(f"{folder}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    return tensors[name].float()


def _blocks(tensors: dict[str, Tensor], name, config: MedusaConfig, folder: Path) -> dict[str, Tensor]:
    """The residual blocks' weights [K, L, D, D] and biases [K, L, D], file names from name(k, layer,
    "weight" | "bias"); biases absent from the file are zero."""
    K, L, D = config.num_heads, config.num_layers, config.hidden_size
    weight, bias = torch.zeros(K, L, D, D), torch.zeros(K, L, D)
    for k in range(K):
        for layer in range(L):
            weight[k, layer] = _tensor(tensors, name(k, layer, "weight"), folder, (D, D))
            if name(0, 0, "bias") in tensors:
                bias[k, layer] = _tensor(tensors, name(k, layer, "bias"), folder, (D,))
    return {"weight": weight, "bias": bias}


def _vllm_config(raw: dict, folder: Path) -> MedusaConfig:
    # vLLM's MedusaConfig.from_pretrained renames medusa_num_heads / medusa_num_layers the same way
    K = raw.get("num_heads", raw.get("medusa_num_heads"))
    L = raw.get("num_hidden_layers", raw.get("medusa_num_layers", 1))
    for key, value in (("num_heads", K), ("hidden_size", raw.get("hidden_size")),
                       ("vocab_size", raw.get("vocab_size"))):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{folder}/config.json: {key} missing or not a positive integer ({value!r})")
    V = raw["vocab_size"]
    truncated = raw.get("truncated_vocab_size") or V
    if not 1 <= truncated <= V:
        raise ValueError(f"{folder}/config.json: truncated_vocab_size {truncated} is not within 1..{V} (vocab_size)")
    return MedusaConfig(hidden_size=raw["hidden_size"], vocab_size=V, num_heads=K, num_layers=L,
                        draft_vocab_size=truncated if truncated < V else None,
                        shared_lm_head=bool(raw.get("original_lm_head", False)),
                        verifier=raw.get("base_model_name_or_path"),
                        extra={k: v for k, v in raw.items() if k not in VLLM_KNOWN})


def _vllm_state(config: MedusaConfig, raw: dict, tensors: dict[str, Tensor], folder: Path) -> dict[str, Tensor]:
    V, D, truncated = config.vocab_size, config.hidden_size, config.draft_size
    if raw.get("medusa_fc_bias") and config.num_layers and "blocks.0.layers.0.bias" not in tensors:
        raise ValueError(f"{folder}: missing tensor blocks.0.layers.0.bias (the config sets medusa_fc_bias)")
    state = _blocks(tensors, lambda k, layer, kind: f"blocks.{k}.layers.{layer}.{kind}", config, folder)
    ids = torch.arange(V)
    if truncated < V:
        ids = _tensor(tensors, "token_map", folder).long()
        distinct = ids.shape == (truncated,) and len(set(ids.tolist())) == truncated
        if not distinct or int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"{folder}: token_map does not name {truncated} distinct target tokens "
                             f"(truncated_vocab_size) below {V} (vocab_size)")
    rows = []
    for k in range(1 if config.shared_lm_head else config.num_heads):
        name = f"lm_heads.{k}.weight"
        full = name in tensors and truncated < V and tensors[name].shape[0] == V  # cut to the map, as vLLM does
        rows.append(_tensor(tensors, name, folder, (V if full else truncated, D))[ids if full else slice(None)])
    scale = float(raw.get("logit_scale", 1.0))  # vLLM scales the logits: the same as scaling the rows
    return {**state, "lm_head": torch.stack(rows) * scale, "draft_ids": ids}


def _fasterdecoding_config(raw: dict, tensors: dict[str, Tensor], folder: Path) -> MedusaConfig:
    heads = [int(name.split(".")[0]) for name in tensors if name.split(".")[0].isdigit()]
    if not heads:
        raise ValueError(f"{folder}: neither vLLM's Medusa tensors (blocks.*, lm_heads.*) nor FasterDecoding's "
                         "({head}.{layer}.linear.weight, {head}.{num_layers}.weight)")
    K, L = raw.get("medusa_num_heads") or 1 + max(heads), raw.get("medusa_num_layers", 1)
    V, D = _tensor(tensors, f"0.{L}.weight", folder).shape  # whole-vocabulary projections
    return MedusaConfig(hidden_size=D, vocab_size=V, num_heads=K, num_layers=L,
                        verifier=raw.get("base_model_name_or_path"))


def _fasterdecoding_state(config: MedusaConfig, tensors: dict[str, Tensor], folder: Path) -> dict[str, Tensor]:
    K, L = config.num_heads, config.num_layers
    state = _blocks(tensors, lambda k, layer, kind: f"{k}.{layer}.linear.{kind}", config, folder)
    shape = (config.vocab_size, config.hidden_size)
    lm_head = torch.stack([_tensor(tensors, f"{k}.{L}.weight", folder, shape) for k in range(K)])
    return {**state, "lm_head": lm_head, "draft_ids": torch.arange(config.vocab_size)}

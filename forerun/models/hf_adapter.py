"""Any Hugging Face causal LM through transformers: the slower fallback for architectures the native
runtime (forerun.models.llama) does not implement, such as GPT-2, Phi or Gemma.

It keeps the contract the decoding loop relies on (one forward over a token tree at explicit
positions; a cache that keeps the accepted path on commit) on top of transformers' own modules:

- the tree goes in as a custom 4D attention mask (0 where a token sees a key, the dtype's minimum
  elsewhere), which transformers passes through to its attention unchanged;
- the cache is transformers' DynamicCache. It holds exactly the committed tokens: a forward appends
  the tree, and commit keeps the accepted nodes' entries and drops the rest.

What it costs and what it lacks, against the native runtime: transformers' per-step Python and
allocation overhead (a DynamicCache grows by concatenation), no fused CPU kernels, no q4, and no
partial forwards, so `layer-skip` and `del` (which run the target's first layers) are unavailable.
Models whose logits are more than head(final hidden state) (Gemma 2's soft-capping, for one) give
slightly different drafts from a `draft` model of that kind, never different verified output.
Models with sliding-window attention are refused: a custom mask would silently drop the window.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from forerun.models.llama import CausalLM


@dataclass(frozen=True)
class AdapterArgs:
    """The few model facts the engine reads (a subset of forerun.models.args.ModelArgs)."""
    arch: str
    vocab_size: int
    num_layers: int
    max_position_embeddings: int


class AdapterCache:
    """A transformers DynamicCache that holds the committed sequence, slots [0, length)."""

    def __init__(self, max_len: int):
        from transformers import DynamicCache

        self.hf = DynamicCache()
        self.max_len = max_len

    @property
    def length(self) -> int:
        return self.hf.get_seq_length()

    def _keep(self, index: Tensor | slice) -> None:
        for layer in self.hf.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys[:, :, index], layer.values[:, :, index]

    def prepare(self, start: int, new: int) -> None:
        """Before a forward of `new` tokens at slot `start`: drop whatever lies past `start`."""
        if start > self.length:
            raise ValueError(f"a forward at slot {start}, but the cache holds only {self.length} tokens")
        if start + new > self.max_len:
            raise ValueError(f"KV cache overflow: need {start + new} slots, have {self.max_len}")
        if start < self.length:
            self._keep(slice(0, start))

    def commit(self, start: int, path: Tensor) -> None:
        """Keep the accepted nodes `path` ([A] indices relative to `start`) as slots [start, start + A)."""
        n, path = path.shape[0], path.cpu()
        if torch.equal(path, torch.arange(n)):  # a prefix of the tree: only the rest goes
            if start + n < self.length:
                self._keep(slice(0, start + n))
            return
        keep = torch.cat([torch.arange(start), path + start])
        device = next((layer.keys.device for layer in self.hf.layers if getattr(layer, "keys", None) is not None),
                      torch.device("cpu"))
        self._keep(keep.to(device))


class HFAdapter(CausalLM):
    """Wraps a transformers *ForCausalLM with the interface of forerun.models.llama.Transformer."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        config = hf_model.config
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise ValueError(f"{type(hf_model).__name__} uses sliding-window attention, which the "
                             "transformers adapter cannot express in a tree mask")
        self.hf = hf_model.eval()
        self.args = AdapterArgs(
            arch=f"transformers:{type(hf_model).__name__}",
            vocab_size=config.vocab_size,
            num_layers=config.num_hidden_layers,
            max_position_embeddings=getattr(config, "max_position_embeddings", None) or 2048,
        )
        self.embed = hf_model.get_input_embeddings().weight
        # transformers renamed past_key_values to cache (5.2x onwards, model by model)
        self._cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
        self.head = hf_model.get_output_embeddings()

    quantization = None

    def float32_logits(self) -> None:  # logits are returned as float32 already
        pass

    def pack_for_cpu(self) -> bool:
        return False

    def new_cache(self, max_len: int) -> AdapterCache:
        return AdapterCache(max_len)

    def forward(self, tokens: Tensor, positions: Tensor, cache: AdapterCache, start: int,
                tree_mask: Tensor | None = None, num_layers: int | None = None, logits: bool = True,
                prefill: bool = False) -> Tensor:
        """As Transformer.forward: [T, vocab] float32 logits, or [T, hidden] final-normed states."""
        if num_layers is not None:
            raise ValueError("partial forwards (layer-skip, del) need a model the native runtime runs "
                             f"(Llama, Mistral, Qwen2/3), not {self.args.arch}")
        T = tokens.shape[0]
        cache.prepare(start, T)
        if tree_mask is None:
            tree_mask = torch.ones(T, T, dtype=torch.bool).tril()
        # tree_mask covers the last K slots ending at start + T (K > T: nodes of earlier forwards)
        visible = torch.cat([torch.ones(T, start + T - tree_mask.shape[1], dtype=torch.bool), tree_mask.cpu()], dim=1)
        additive = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, torch.finfo(self.dtype).min)
        inputs = dict(input_ids=tokens[None].to(self.device), position_ids=positions[None].to(self.device),
                      attention_mask=additive[None, None].to(self.device), use_cache=True, **{self._cache_arg: cache.hf})
        if not logits:
            return self.hf.base_model(**inputs).last_hidden_state[0]
        return self.hf(**inputs).logits[0].float()


def load_adapter(path: str, dtype: torch.dtype, device: torch.device) -> HFAdapter:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise ValueError(f"{path} is not a Llama-family model; running it needs transformers "
                         "(pip install transformers)") from exc
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return HFAdapter(hf_model)

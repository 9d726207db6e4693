"""Any Hugging Face causal LM through transformers: the slower fallback for architectures the native
runtime (forerun.models.llama) does not implement, such as GPT-2, Phi or Gemma.

It keeps the contract of a forward (forerun.models.batch.ForwardBatch: the rows of many sequences,
their K/V written at explicit slots of a store, each attending to its own sequence's slots) on top
of transformers' own modules, one sequence at a time:

- the sequence's cached keys and values are gathered from the store into a fresh DynamicCache, and
  its new rows run with a custom 4D attention mask (0 where a row sees a key, the dtype's minimum
  elsewhere), which transformers passes through to its attention unchanged;
- the K/V transformers appends for the new rows are written back to the store at their slots.

What it costs and what it lacks, against the native runtime: a per-sequence forward and a copy of
each sequence's cached K/V every step, transformers' Python overhead, no fused CPU kernels, no q4,
and no partial forwards, so `layer-skip` and `del` (which run the target's first layers) are
unavailable. Models whose logits are more than head(final hidden state) (Gemma 2's soft-capping, for
one) give slightly different drafts from a `draft` model of that kind, never different verified
output. Models with sliding-window attention are refused: a custom mask would silently drop the window.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from forerun.cache import KVCache
from forerun.models.batch import ForwardBatch, ForwardOutput
from forerun.models.llama import CausalLM


@dataclass(frozen=True)
class AdapterArgs:
    """The few model facts the engine reads (a subset of forerun.models.args.ModelArgs)."""
    arch: str
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int


def _recording_cache():
    """A DynamicCache that also keeps what each layer appends (the new rows' K/V)."""
    from transformers import DynamicCache

    class Recording(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self.appended[layer_idx] = (key_states, value_states)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    cache = Recording()
    cache.appended = {}
    return cache


class HFAdapter(CausalLM):
    """Wraps a transformers *ForCausalLM with the interface of forerun.models.llama.Transformer."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        config = hf_model.config
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise ValueError(f"{type(hf_model).__name__} uses sliding-window attention, which the "
                             "transformers adapter cannot express in a tree mask")
        self.hf = hf_model.eval()
        heads = config.num_attention_heads
        self.args = AdapterArgs(
            arch=f"transformers:{type(hf_model).__name__}",
            vocab_size=config.vocab_size,
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
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

    def new_cache(self, slots: int) -> KVCache:
        a = self.args
        return KVCache(a.num_layers, a.num_kv_heads, a.head_dim, slots, self.kv_dtype, self.device)

    def forward(self, batch: ForwardBatch, kv: KVCache, num_layers: int | None = None,
                keep_layers: tuple[int, ...] = ()) -> ForwardOutput:
        if num_layers is not None or keep_layers:
            raise ValueError("partial forwards (layer-skip, del) need a model the native runtime runs "
                             f"(Llama, Mistral, Qwen2/3), not {self.args.arch}")
        hidden = torch.cat([self._sequence(batch, b, kv) for b in range(batch.sequences)])
        rows = hidden[batch.logit_rows.to(self.device)]
        return ForwardOutput(logits=self.head(rows).float(), hidden=hidden, layers={})

    def _sequence(self, batch: ForwardBatch, b: int, kv: KVCache) -> Tensor:
        """Sequence b's rows through the HF model; their final hidden states [T, D]."""
        rows, keys = batch.rows_of(b), batch.keys_of(b).to(self.device)
        T = rows.stop - rows.start
        cache = _recording_cache()
        for layer in range(self.args.num_layers):  # the cached prefix, as transformers expects it
            cache.update(kv.k[layer][:, keys[:-T]][None], kv.v[layer][:, keys[:-T]][None], layer)
        visible = batch.full_mask(b)
        additive = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, torch.finfo(self.dtype).min)
        out = self.hf.base_model(input_ids=batch.tokens[rows][None].to(self.device),
                                 position_ids=batch.positions[rows][None].to(self.device),
                                 attention_mask=additive[None, None].to(self.device), use_cache=True,
                                 **{self._cache_arg: cache})
        for layer, (k, v) in cache.appended.items():  # the new rows' K/V, to their slots
            kv.k[layer][:, keys[-T:]] = k[0].to(kv.k.dtype)
            kv.v[layer][:, keys[-T:]] = v[0].to(kv.v.dtype)
        return out.last_hidden_state[0]


def load_adapter(path: str, dtype: torch.dtype, device: torch.device) -> HFAdapter:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise ValueError(f"{path} is not a Llama-family model; running it needs transformers "
                         "(pip install transformers)") from exc
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return HFAdapter(hf_model)

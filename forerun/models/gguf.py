"""Convert a llama.cpp GGUF file into a Hugging Face model directory, the one format the loader reads.

Every tensor is dequantized to float32 there; projection_blocks reads the quantized projections of the
block types the native kernels run (quant q4) straight from the file instead. The tokenizer is rebuilt
from the `tokenizer.ggml.*` metadata.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from forerun.models.quant import GGUF_READERS, QuantWeight, from_gguf, take_rows
from forerun.models.tokenizer import Tokenizer

# Bump whenever the converted output changes, so that cached conversions are rebuilt.
CONVERTER_VERSION = 1

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# llama.cpp per-layer tensor name -> Hugging Face name (suffix .weight/.bias kept).
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Pre-tokenizer split patterns, as in the models' own tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")


def gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors, generation_config.json and tokenizer files into `out_dir`."""
    reader = gguf.GGUFReader(gguf_path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {sorted(HF_ARCHITECTURES)})")
    raw = {t.name: _dequantize(t) for t in reader.tensors}
    config = _hf_config(meta, arch, raw)
    tensors = _hf_tensors(raw, arch, config)
    tokenizer = _tokenizer(meta)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _generation_config(meta))
    tokenizer.save(out_dir)
    _write_json(out_dir / SOURCE_TYPES, _projection_types(reader))
    return out_dir


SOURCE_TYPES = "gguf_projection_types.json"  # beside a conversion: the GGUF block types it came from


def projection_types(gguf_path: str | Path, converted: Path | None = None) -> set[str]:
    """The GGUF block types of the file's transformer-block projections (e.g. {"Q4_1"}). Read from
    the conversion's record when there is one (reading a GGUF's header parses its whole vocabulary:
    seconds); else from the file, and recorded there."""
    record = None if converted is None else Path(converted) / SOURCE_TYPES
    if record is not None and record.is_file():
        return set(json.loads(record.read_text()))
    types = _projection_types(gguf.GGUFReader(gguf_path))
    if record is not None:
        try:
            _write_json(record, types)
        except OSError:  # a read-only cache still works, just slower to start
            pass
    return set(types)


def projection_blocks(gguf_path: str | Path, config: dict[str, Any]) -> dict[str, QuantWeight]:
    """The file's projections and output head whose block types the native kernels run as stored
    (forerun.models.quant.GGUF_READERS), read straight from its blocks, by Hugging Face name; for a
    tied head, the embedding's blocks as `lm_head.weight`. Llama's Q/K rows are un-permuted as whole
    rows of blocks, as the float conversion un-permutes them."""
    reader = gguf.GGUFReader(gguf_path)
    blocks = {}
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in GGUF_READERS or len(tensor.shape) != 2:
            continue
        if tensor.name == "token_embd.weight":
            if not config["tie_word_embeddings"]:
                continue
            name = "lm_head.weight"
        else:
            name = _hf_name(tensor.name)
        k, n = (int(d) for d in tensor.shape)
        weight = from_gguf(tensor.data, tensor.tensor_type.name, n, k)
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            weight = take_rows(weight, _unpermute_qk(np.arange(n), heads))
        blocks[name] = weight
    return blocks


def _projection_types(reader: gguf.GGUFReader) -> list[str]:
    return sorted({t.tensor_type.name for t in reader.tensors
                   if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2})


# -- metadata ------------------------------------------------------------------------------------


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _hf_config(meta: dict[str, Any], arch: str, raw: dict[str, np.ndarray]) -> dict[str, Any]:
    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length") or hidden // heads
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError("partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    if key("rope.scaling.type", "none") not in ("none", "llama3"):
        raise ValueError(f"rope scaling {key('rope.scaling.type')!r} is not supported")
    theta = _f32(key("rope.freq_base", 10000.0))
    config = {
        "architectures": [HF_ARCHITECTURES[arch]],
        "model_type": arch,
        # The embedding's row count, not the token list: some models pad the matrix past the vocabulary.
        "vocab_size": raw["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": key("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in raw,
        "attention_bias": "blk.0.attn_q.bias" in raw,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if "rope_freqs.weight" in raw:
        config["rope_scaling"] = _llama3_rope_scaling(raw["rope_freqs.weight"], theta, head_dim)
    return config


def _f32(value: float) -> float:
    """GGUF stores float32; its shortest decimal form gives back the original config's 1e-05, not 9.99999974e-06."""
    return float(str(np.float32(value)))


def _llama3_rope_scaling(freq_factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """llama.cpp stores Llama 3.1 rope scaling as per-frequency divisors rather than its parameters.

    Every Llama 3.x release uses low/high factors 1/4 over an 8192 original context and differs only in
    `factor` (the largest divisor), so rebuild those parameters and check they reproduce the divisors.
    """
    params = {"rope_type": "llama3", "factor": float(freq_factors.max()), "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = np.clip((params["original_max_position_embeddings"] / wavelen - 1.0) / (4.0 - 1.0), 0.0, 1.0)
    expected = 1.0 / ((1 - smooth) / params["factor"] + smooth)
    if not np.allclose(expected, freq_factors, rtol=1e-3):
        raise ValueError("rope_freqs.weight does not match Llama 3 rope scaling; this rope scaling is not supported")
    return params


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    # End-of-turn / end-of-message tokens stop generation just like EOS.
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    return {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": sorted(set(eos))}


# -- tensors -------------------------------------------------------------------------------------


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    # GGUF lists dimensions fastest-first; numpy (and HF) want them slowest-first.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(values.reshape(shape), dtype=np.float32)


def _hf_tensors(raw: dict[str, np.ndarray], arch: str, config: dict[str, Any]) -> dict[str, np.ndarray]:
    tensors = {}
    for name, value in raw.items():
        if name == "rope_freqs.weight":  # folded into config["rope_scaling"]
            continue
        hf_name = _hf_name(name)
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in hf_name else config["num_key_value_heads"]
            value = _unpermute_qk(value, heads)
        tensors[hf_name] = value
    return tensors


def _hf_name(name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER_NAME.fullmatch(name)
    if match is None or match[2] not in _LAYER_TENSORS:
        raise ValueError(f"GGUF tensor {name!r} has no Hugging Face counterpart in the supported architectures")
    return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{match[3]}"


def _unpermute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permute of Q/K rows.

    llama.cpp rotates adjacent pairs (GPT-J style) while HF rotates the two halves of each head, so the
    converter interleaves each head's halves; here they are split back: rows (h, i, half) -> (h, half, i).
    """
    half = weight.shape[0] // heads // 2
    rows = weight.reshape(heads, half, 2, *weight.shape[1:])
    return np.ascontiguousarray(rows.swapaxes(1, 2).reshape(weight.shape))


# -- tokenizer -----------------------------------------------------------------------------------


def _tokenizer(meta: dict[str, Any]) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind not in _BACKENDS:
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2', and SentencePiece "
            "BPE, 'llama'); use the model's Hugging Face directory instead"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF token list has duplicate tokens; ids would not be preserved")
    backend = _BACKENDS[kind](meta, vocab)
    _add_special_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or [])

    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    bos = _token_at(tokens, meta.get("tokenizer.ggml.bos_token_id"))
    backend.post_processor = (
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                      special_tokens=[(bos, vocab[bos])])
        if add_bos and bos
        else processors.ByteLevel(trim_offsets=False) if kind == "gpt2" else None
    )
    config = {
        "bos_token": bos,
        "eos_token": _token_at(tokens, meta.get("tokenizer.ggml.eos_token_id")),
        "pad_token": _token_at(tokens, meta.get("tokenizer.ggml.padding_token_id")),
        "unk_token": _token_at(tokens, meta.get("tokenizer.ggml.unknown_token_id")),
        "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": False,
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return Tokenizer(backend, config)


def _byte_level_bpe(meta: dict[str, Any], vocab: dict[str, int]) -> tokenizers.Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    # Llama 3's tokenizer.json looks whole words up in the vocabulary before merging.
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3_PRE))
    if pre in _QWEN2_PRE:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


_SPACE = "\u2581"  # SentencePiece's visible space


def _sentencepiece_bpe(meta: dict[str, Any], vocab: dict[str, int]) -> tokenizers.Tokenizer:
    """SentencePiece's BPE (Llama 2, Mistral) as a `tokenizers` BPE: spaces become \u2581 and the text
    starts with one; pieces merge highest score first (the merges come from the scores, which the
    file has instead of merges); a character no piece covers becomes its UTF-8 bytes' <0xXX> tokens."""
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    types = meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    unk = _token_at(tokens, meta.get("tokenizer.ggml.unknown_token_id"))
    backend = tokenizers.Tokenizer(models.BPE(vocab, _merges_by_score(tokens, scores, types, vocab),
                                              unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    if unk is not None:  # matched whole in text and skipped in decoding, as SentencePiece's <unk> is
        backend.add_special_tokens([AddedToken(unk, special=True, normalized=False)])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first" if prefix else "never",
                                                     split=False)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)
    return backend


def _merges_by_score(tokens: list[str], scores: list[float], types: list[int],
                     vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) pair of pieces that joins into a piece, in the order SentencePiece merges:
    the joined piece's score, highest first (ties: the lower ids first, as its vocabulary order)."""
    ranked = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind not in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED):
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


_BACKENDS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("default", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # GPT-2 splitting, with every digit a word of its own
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    split = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT if pre in _QWEN2_PRE else None
    if split is None:
        supported = ["default", "gpt2", "smollm", *_LLAMA3_PRE, *_QWEN2_PRE]
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {supported})")
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _add_special_tokens(backend: tokenizers.Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens (<|im_end|>) are special; user-defined ones (<think>) are matched whole but kept
    in decoded text. Either way BPE must never split them, so both become added tokens."""
    kinds = list(zip(tokens, token_types))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in kinds if k == gguf.TokenType.CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in kinds if k == gguf.TokenType.USER_DEFINED]
    )


def _token_at(tokens: list[str], index: int | None) -> str | None:
    return None if index is None else tokens[index]


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False))

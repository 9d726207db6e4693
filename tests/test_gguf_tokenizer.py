"""GGUF -> Hugging Face conversion and the tokenizer, checked against transformers' own GGUF loader."""
from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from conftest import write_gguf
from forerun import kernels
from forerun.models import embedded
from forerun.models.args import ModelArgs
from forerun.models.embedded import converted_gguf_dir, embedded_gguf_path, embedded_model_dir, resolve_model_dir
from forerun.models.gguf import SOURCE_TYPES, gguf_to_hf_dir, projection_types
from forerun.models.runtime import load, resolve_quant
from forerun.models.tokenizer import Tokenizer
from forerun.stream import TextStream

SAMPLES = [
    "Hello world",
    "12345 apples, 3.14159",
    "héllo wörld 世界 🤗 ünïcödé",
    "  leading spaces\n\ttabs\n\n  and newlines  ",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n",
    "def f(x):\n    return x ** 2  # square",
]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The embedded model converted once per session, into a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORERUN_CACHE", str(tmp_path_factory.mktemp("cache")))
        return embedded_model_dir()


@pytest.fixture(scope="session")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = embedded_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# -- conversion ----------------------------------------------------------------------------------


def test_embedded_config(model_dir):
    args = ModelArgs.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    assert (args.arch, args.num_layers, args.hidden_size) == ("llama", 30, 576)
    assert (args.num_heads, args.num_kv_heads, args.head_dim, args.vocab_size) == (9, 3, 64, 49152)
    assert args.tie_word_embeddings and args.rms_norm_eps == 1e-5 and args.rope_theta == 100000.0
    with safe_open(model_dir / "model.safetensors", "np") as f:
        assert "lm_head.weight" not in f.keys()
        assert len(list(f.keys())) == 2 + 30 * 9  # embed, final norm, 9 tensors per layer


def test_weights_match_transformers_gguf_processing(model_dir):
    """The real file's tensors, dequantized by gguf and un-permuted by transformers' own Llama code."""
    pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    pairs = {"blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
             "blk.7.attn_k.weight": "model.layers.7.self_attn.k_proj.weight",
             "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",
             "blk.3.ffn_norm.weight": "model.layers.3.post_attention_layernorm.weight",
             "token_embd.weight": "model.embed_tokens.weight"}
    tensors = {t.name: t for t in gguf.GGUFReader(embedded_gguf_path()).tensors if t.name in pairs}
    with safe_open(model_dir / "model.safetensors", "np") as f:
        for gguf_name, hf_name in pairs.items():
            t = tensors[gguf_name]
            raw = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            expected = processor.process(raw, gguf_name).weights
            np.testing.assert_array_equal(f.get_tensor(hf_name), expected, err_msg=hf_name)


def test_tiny_gguf_matches_transformers_loader(tmp_path):
    """transformers' full GGUF loader (names, Q/K un-permute, config) on a file small enough to load fast."""
    transformers = pytest.importorskip("transformers")
    import torch
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = _write_tiny_gguf(tmp_path / "tiny.gguf", "llama", _tiny_weights("llama"))
    # AutoModelForCausalLM.from_pretrained(gguf_file=...) needs accelerate; this is the loader it calls.
    config = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    reference = {name: np.asarray(value) for name, value in loaded["tensors"].items()}
    ours = load_file(gguf_to_hf_dir(path, tmp_path / "hf") / "model.safetensors")
    assert ours.keys() == reference.keys()
    for name, value in ours.items():
        np.testing.assert_array_equal(value, reference[name], err_msg=name)


def test_cache_reuse(model_dir, monkeypatch):
    monkeypatch.setenv("FORERUN_CACHE", str(model_dir.parents[1]))
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(embedded, "gguf_to_hf_dir", _must_not_convert)
    start = time.perf_counter()
    assert embedded_model_dir() == model_dir
    assert resolve_model_dir(None) == model_dir
    assert resolve_model_dir(str(embedded_gguf_path())) == model_dir
    assert time.perf_counter() - start < 0.5
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def _must_not_convert(*_):
    raise AssertionError("a cached conversion was redone")


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FORERUN_CACHE", str(tmp_path / "cache"))
    gguf_path = _write_tiny_gguf(tmp_path / "tiny.gguf", "llama", _tiny_weights("llama"))

    def crash(_, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "gguf_to_hf_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        converted_gguf_dir(gguf_path)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
    monkeypatch.setattr(embedded, "gguf_to_hf_dir", gguf_to_hf_dir)
    assert (converted_gguf_dir(gguf_path) / "model.safetensors").is_file()


def test_resolve_model_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; give a Hugging Face model directory, a .gguf file or a Hub id"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(tmp_path) == tmp_path


# -- synthetic GGUF ------------------------------------------------------------------------------

TINY = dict(layers=2, hidden=16, heads=4, kv_heads=2, ffn=24, vocab=8)


def _tiny_weights(arch: str) -> dict[str, np.ndarray]:
    """HF-named random weights for a tiny model (untied, with an lm_head)."""
    rng = np.random.default_rng(0)
    h, ffn, hd = TINY["hidden"], TINY["ffn"], TINY["hidden"] // TINY["heads"]
    q, kv = TINY["heads"] * hd, TINY["kv_heads"] * hd
    shapes = {"model.embed_tokens.weight": (TINY["vocab"], h), "model.norm.weight": (h,),
              "lm_head.weight": (TINY["vocab"], h)}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                   p + "mlp.down_proj.weight": (h, ffn)}
        if arch == "qwen3":
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama Q/K weights."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in names:
        return names[hf_name]
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    module = rest.removesuffix(".weight")
    return f"blk.{layer}.{parts[module]}.weight"


def _write_tiny_gguf(path: Path, arch: str, weights: dict[str, np.ndarray], tokenizer_model: str = "gpt2") -> Path:
    tensors = {}
    for name, value in weights.items():
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            value = _llama_cpp_permute(value, TINY["heads"] if "q_proj" in name else TINY["kv_heads"])
        tensors[_gguf_name(name)] = value
    return write_gguf(path, arch, TINY, tensors, tokenizer_model)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_synthetic_gguf_round_trip(tmp_path, arch):
    weights = _tiny_weights(arch)
    out = gguf_to_hf_dir(_write_tiny_gguf(tmp_path / "tiny.gguf", arch, weights), tmp_path / "hf")
    converted = load_file(out / "model.safetensors")
    assert converted.keys() == weights.keys()
    for name, value in weights.items():
        np.testing.assert_array_equal(converted[name], value, err_msg=name)
    args = ModelArgs.from_hf_config(json.loads((out / "config.json").read_text()))
    assert (args.arch, args.num_layers, args.num_kv_heads, args.tie_word_embeddings) == (arch, 2, 2, False)
    assert args.qk_norm == (arch == "qwen3")
    tok = Tokenizer.from_dir(out)
    assert tok.encode("ab ab") == [4, 6] and tok.decode([4, 6]) == "ab ab"
    assert tok.eos_token_ids == {1} and tok.bos_token_id == 0


def test_quant_auto_is_q4_only_for_block_ggufs_on_the_cpu(tmp_path, monkeypatch):
    """auto runs a GGUF of block types the kernels take as stored (here the embedded Q4_1 model; the
    K-quant mixes in test_gguf_blocks.py) on its own blocks, and dequantizes anything else: float
    tensors, another dtype, `quant="none"`."""
    monkeypatch.setenv("FORERUN_CACHE", str(tmp_path / "cache"))
    tiny = _write_tiny_gguf(tmp_path / "tiny.gguf", "llama", _tiny_weights("llama"))
    assert projection_types(tiny) == {"F32"}
    assert load(str(tiny)).model.quantization is None
    converted = next((tmp_path / "cache" / "gguf").iterdir())
    assert json.loads((converted / SOURCE_TYPES).read_text()) == ["F32"]  # recorded at conversion

    q4 = "q4" if kernels.cpu_kernels() is not None else None  # without kernels auto stays float
    assert resolve_quant("auto", None, "float32", "cpu") == q4  # the embedded Q4_1 GGUF
    assert resolve_quant("auto", None, "bfloat16", "cpu") is None
    assert resolve_quant("auto", None, "float32", "cuda") is None
    assert resolve_quant("none", None, "float32", "cpu") is None
    assert resolve_quant(None, None, "float32", "cpu") is None
    with pytest.raises(ValueError, match="unknown quant"):
        load(quant="q8")
    with pytest.raises(ValueError, match="float32"):
        load(str(tmp_path / "never-converted.gguf"), dtype="bfloat16", quant="q4")  # before any file access


def test_unsupported_gguf_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        gguf_to_hf_dir(_write_tiny_gguf(tmp_path / "a.gguf", "gpt2", {}), tmp_path / "a")
    with pytest.raises(ValueError, match="tokenizer model 't5' is not supported"):
        gguf_to_hf_dir(_write_tiny_gguf(tmp_path / "b.gguf", "llama", _tiny_weights("llama"), "t5"), tmp_path / "b")


# -- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_attributes(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2}  # <|im_start|>, <|im_end|>
    assert tok.encode("Hi") == tok.encode("Hi", add_bos=False)  # SmolLM2 adds no BOS
    assert tok.encode("Hi", add_bos=True)[0] == 1


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_and_transformers_ids(tok, hf_gguf_tokenizer, text):
    ids = tok.encode(text)
    assert ids == hf_gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special=False) == text


def test_digits_split(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5 and tok.decode(ids) == "12345"


def test_skip_special(tok):
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"


def test_saved_dir_loads_in_transformers(tok, model_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    for text in SAMPLES:
        assert hf(text)["input_ids"] == tok.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert expected == tok.apply_chat_template(messages)


def test_save_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.same_vocab(tok)
    assert (again.eos_token_ids, again.bos_token_id, again.chat_template) == \
        (tok.eos_token_ids, tok.bos_token_id, tok.chat_template)
    assert again.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])


def test_same_vocab_rejects_other_tokenizer(tok, tmp_path):
    out = gguf_to_hf_dir(_write_tiny_gguf(tmp_path / "tiny.gguf", "llama", _tiny_weights("llama")), tmp_path / "hf")
    assert tok.same_vocab(tok) and not tok.same_vocab(Tokenizer.from_dir(out))


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert text.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")
    no_prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert no_prompt.endswith("<|im_end|>\n")


def test_raise_exception_in_template(tok, tmp_path):
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ raise_exception('only user messages') }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="only user messages"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_text_stream_never_splits_characters(tok):
    text = "héllo 世界 🤗 done"
    ids = tok.encode(text)
    pieces: list[str] = []
    stream = TextStream(tok, (), pieces.append)
    held_back = 0
    for i in ids:
        before = len(pieces)
        stream([i])
        held_back += len(pieces) == before
    stream.final_text(ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert held_back > 0  # the emoji spans several byte tokens, so some steps hold text back


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)

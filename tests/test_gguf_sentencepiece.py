"""SentencePiece GGUF tokenizers (`tokenizer.ggml.model == "llama"`: Llama 2, Mistral), rebuilt from the
file's pieces, scores and types, against transformers' own GGUF tokenizer loader on a file built here."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import write_gguf
from forerun.config import SamplingParams, SpecConfig
from forerun.llm import LLM
from forerun.models.embedded import converted_gguf_dir
from forerun.models.tokenizer import Tokenizer

SPECIAL = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
CHARS = list("\u2581abcdefghijklmnopqrstuvwxyzHTW.,!?'0123456789\u00e9")
# Joined pieces, most frequent first (SentencePiece's scores fall with the merge order); each is two
# pieces listed before it, some in two ways ("▁the": "▁t" + "he" and "▁th" + "e").
PIECES = ["he", "\u2581t", "\u2581th", "\u2581the", "ll", "llo", "\u2581H", "\u2581He", "\u2581Hello", "\u2581w", "or",
          "\u2581wor", "ld", "\u2581world", "in", "\u2581in", "ing", "\u2581a", "an", "\u2581an", "er",
          "\u2581\u2581", "\u2581\u2581\u2581\u2581", "\u00e9t", "\u2581\u00e9", "\u2581\u00e9t", "\u2581thing"]
TOKENS = SPECIAL + BYTES + CHARS + PIECES
SAMPLES = [
    "Hello world",
    "the thing in an apple, the end!",
    "  leading spaces and    four",
    "tabs\tand\nnewlines\n\n",
    "h\u00e9llo w\u00f6rld \u00e9t\u00e9 \u4e16\u754c \U0001f917",  # ö, 世界 and 🤗 have no piece: their bytes
    "Hello</s> world<s>again",
    "ZQX 42",
    "x",
    "",
]
DIMS = dict(layers=2, hidden=16, heads=4, kv_heads=2, ffn=24)


def write_sentencepiece_tokenizer(w: gguf.GGUFWriter) -> None:
    """SentencePiece BPE, laid out as llama.cpp writes Llama 2's: <unk>, <s>, </s>, the 256 byte
    pieces, then the vocabulary with its scores."""
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * len(BYTES) + [gguf.TokenType.NORMAL] * (len(CHARS) + len(PIECES))
    w.add_token_types(types)
    scores = [0.0] * (len(SPECIAL) + len(BYTES)) + [-1000.0 - i for i in range(len(CHARS))]
    scores += [-float(i) for i in range(len(PIECES))]
    w.add_token_scores(scores)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)


def write_sentencepiece_gguf(path: Path) -> Path:
    """A tiny random Llama with the SentencePiece tokenizer above."""
    rng = np.random.default_rng(0)
    h, hd, ffn, vocab = DIMS["hidden"], DIMS["hidden"] // DIMS["heads"], DIMS["ffn"], len(TOKENS)
    q, kv = DIMS["heads"] * hd, DIMS["kv_heads"] * hd
    shapes = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,), "output.weight": (vocab, h)}
    for i in range(DIMS["layers"]):
        shapes |= {f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
                   f"blk.{i}.attn_q.weight": (q, h), f"blk.{i}.attn_k.weight": (kv, h),
                   f"blk.{i}.attn_v.weight": (kv, h), f"blk.{i}.attn_output.weight": (h, q),
                   f"blk.{i}.ffn_gate.weight": (ffn, h), f"blk.{i}.ffn_up.weight": (ffn, h),
                   f"blk.{i}.ffn_down.weight": (h, ffn)}
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    return write_gguf(path, "llama", DIMS, tensors, tokenizer=write_sentencepiece_tokenizer)


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> Path:
    return write_sentencepiece_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf")


@pytest.fixture(scope="module")
def spm_dir(spm_gguf, tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORERUN_CACHE", str(tmp_path_factory.mktemp("cache")))
        return converted_gguf_dir(spm_gguf)


@pytest.fixture(scope="module")
def reference(spm_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(spm_gguf.parent, gguf_file=spm_gguf.name)


@pytest.mark.parametrize("text", SAMPLES)
def test_encodes_and_decodes_as_the_reference(spm_dir, reference, text):
    tok = Tokenizer.from_dir(spm_dir)
    ids = tok.encode(text)
    assert ids == reference.encode(text)
    assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_pieces_merge_by_score_and_unknown_characters_fall_back_to_bytes(spm_dir):
    tok = Tokenizer.from_dir(spm_dir)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2}
    ids = tok.encode("Hello world", add_bos=False)
    assert [TOKENS[i] for i in ids] == ["\u2581Hello", "\u2581world"]
    ids = tok.encode("\u00f6", add_bos=False)  # ö: no piece, so the UTF-8 bytes C3 B6
    assert [TOKENS[i] for i in ids] == ["\u2581", "<0xC3>", "<0xB6>"]
    assert tok.decode(ids) == "\u00f6"


def test_a_sentencepiece_gguf_generates(spm_gguf, spm_dir, monkeypatch):
    monkeypatch.setenv("FORERUN_CACHE", str(spm_dir.parents[1]))  # the conversion the fixture made
    llm = LLM(str(spm_gguf))
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    [ar] = llm.generate("Hello world", params, SpecConfig(method="ar"), chat=False)
    [pld] = llm.generate("Hello world", params, SpecConfig(method="pld"), chat=False)
    assert len(ar.token_ids) == 12 and ar.token_ids == pld.token_ids
    assert ar.text == llm.tokenizer.decode(ar.token_ids)

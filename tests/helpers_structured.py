"""Tokenizers for the tiny random models, so that grammars can constrain them: one token per
character of a small alphabet (byte-level, as GPT-2's, which grammar libraries read), EOS first,
then a few longer pieces, so that a text has more than one tokenization, as real vocabularies do."""
import dataclasses

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from forerun.models.runtime import Runtime
from forerun.models.tokenizer import Tokenizer

EOS = "</s>"
JSON_PIECES = [*'{}[]":, -.0123456789abcdefghijklmnopqrstuvwxyz', "true", "false", "null", "name", "age", '": ',
               '", "', "ab", "ing", "an", "er", "12", "00"]


def char_tokenizer(pieces: list[str]) -> Tokenizer:
    """EOS is id 0; piece i is id i + 1."""
    vocab = {EOS: 0, **{p.replace(" ", "\u0120"): i for i, p in enumerate(pieces, 1)}}  # Ġ: GPT-2's space
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS])
    return Tokenizer(backend, {"eos_token": EOS, "add_bos_token": False})


def with_tokenizer(runtime: Runtime, pieces: list[str] = JSON_PIECES) -> Runtime:
    """The runtime's model with a character tokenizer of at most its vocabulary's size."""
    assert len(pieces) < runtime.model.args.vocab_size
    return dataclasses.replace(runtime, tokenizer=char_tokenizer(pieces))

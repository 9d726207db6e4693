"""Constraints compiled into grammars, on llguidance (see docs/structured-outputs.md for why that
library and what it costs).

    grammars = Grammars(tokenizer, vocab_size)        # once per model: reads the vocabulary (~0.3 s)
    processor = grammars.processor(StructuredOutput(json=schema))   # per sample, from a cached compile

A constraint compiles once into a matcher kept by the constraint's value; every sample gets a copy of
it (a copy costs microseconds, a compile up to milliseconds).
"""
from __future__ import annotations

import functools
import json
from collections import OrderedDict

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from forerun.config import StructuredOutput
from forerun.structured.processor import GrammarProcessor

CACHED_GRAMMARS = 256  # compiled constraints kept, least recently used dropped first
# One way to write JSON: flexible whitespace lets a small model pad forever, and both forms parse alike.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """The compiled constraints of one model: its vocabulary, as llguidance reads it, and the
    matchers compiled from it, by constraint."""

    def __init__(self, tokenizer, vocab_size: int):
        """tokenizer: forerun.models.tokenizer.Tokenizer; vocab_size: the width of the model's logits,
        which may differ from the tokenizer's (padded embeddings; ids it never produces are masked)."""
        self.vocab_size = vocab_size
        self.eos_ids = tuple(sorted(tokenizer.eos_token_ids))
        if not self.eos_ids:
            raise ValueError("structured output needs a tokenizer with an end-of-sequence token")
        try:
            self.tokenizer = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=max(vocab_size, tokenizer.vocab_size),
                                                    eos_token=list(self.eos_ids))
        except ValueError as e:  # a tokenizer.json llguidance cannot read
            raise ValueError(f"structured output cannot read this model's vocabulary: {e}") from None
        self._encode = functools.partial(tokenizer.encode, add_bos=False)
        self._compiled: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()

    def processor(self, spec: StructuredOutput) -> GrammarProcessor:
        """A fresh sample's processor for `spec`. Raises ValueError, with the reason, when the
        constraint does not compile (a schema llguidance cannot read, a bad regex or grammar)."""
        words = (self.tokenizer.vocab_size + 31) // 32
        return GrammarProcessor(self._matcher(spec).deep_copy(), self.vocab_size, words, frozenset(self.eos_ids))

    def check(self, spec: StructuredOutput) -> None:
        """Raise ValueError if `spec` does not compile (before a request is queued)."""
        self._matcher(spec)

    def _matcher(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        if spec in self._compiled:
            self._compiled.move_to_end(spec)
            return self._compiled[spec]
        matcher = llguidance.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(f"the {spec.kind} constraint does not compile: {matcher.get_error()}")
        for i, choice in enumerate(spec.choice or ()):
            # llguidance can disagree with itself on text it cannot tokenize as the model does (an
            # unassigned code point of plane 10 seen: its mask allowed a token its parser then refused,
            # which failed the request mid-step); each choice must at least be writable as the model
            # writes it, or the request is refused before it is queued
            written = matcher.deep_copy()
            if not all(written.consume_token(t) for t in self._encode(choice)):
                problem = written.get_error().splitlines()[0]
                raise ValueError(f"choice {i} cannot be written in this model's vocabulary under the grammar: {problem}")
        self._compiled[spec] = matcher
        if len(self._compiled) > CACHED_GRAMMARS:
            self._compiled.popitem(last=False)
        return matcher


def check_constraint(spec: StructuredOutput) -> None:
    """Raise ValueError, with the reason, if `spec` does not compile; needs no vocabulary (a server
    checks a request with it before queueing it)."""
    problem = llguidance.LLMatcher.validate_grammar(grammar_text(spec))
    if problem:
        raise ValueError(f"the {spec.kind} constraint does not compile: {problem.strip()}")


def grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar for a constraint (compiled and checked by the matcher)."""
    if spec.json is not None:
        return llguidance.LLMatcher.grammar_from_json_schema(spec.json, defaults=JSON_OPTIONS)
    if spec.json_object:
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:  # Lark string literals read JSON's escapes
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    try:  # GBNF (llama.cpp's, which vLLM's guided_grammar examples use) becomes Lark; Lark stays
        lark = any_to_lark(spec.grammar)
    except Exception as e:  # GbnfToLarkError, or a plain Exception for text with no `root` rule (a blank one)
        raise ValueError(f"the grammar constraint is neither Lark nor GBNF: {e}") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)

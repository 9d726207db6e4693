"""Structured outputs: constraints (JSON schema, regex, choice, grammar) compiled into per-sample
processors that mask every draft node's logits, and the tool calls of chat requests."""
from forerun.structured.grammar import Grammars
from forerun.structured.processor import ConstraintBroken, GrammarProcessor

__all__ = ["ConstraintBroken", "Grammars", "GrammarProcessor"]

"""The drafter interface: propose a token tree for a sequence, then observe how verification went.

The engine calls a drafter for each sequence of a batched step: propose(seq, depth) before the
forward, observe(seq, draft, verdict, scores) after it. One drafter object serves every sequence of
its SpecConfig, so what it knows lives in one of two places, and each strategy says which:

- Per request: what begin(seq) returns. The engine keeps it on the sequence (seq.draft_state),
  hands it back through the sequence at every call, and drops it when the sequence ends, after
  end(seq) releases what it holds. Examples: a draft model's KV cache (draft, rasd), lookahead's
  Jacobi window and n-gram pool, DEL's acceptance estimates per exit layer.
- Persistent: the drafter's own attributes, shared by all sequences of its SpecConfig and kept
  across requests on purpose, because they learn from everything the target says: STAND's n-gram
  tables and tree-shape statistics, Token Recycling's successor matrix, a retrieval datastore.
  (The engine also keeps per SpecConfig a SpeedGuard's measurements and the goodput policy's odds.)
Some keep only per-request state (pld: the sequence's tokens as a growing array for its n-gram
search); stateless ones (ar, retrieval, layer-skip) keep neither.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from forerun.config import SpecConfig
from forerun.engine.sequence import Sequence
from forerun.tree import Tree
from forerun.types import Draft, Scores, Verdict


class Drafter(ABC):
    """Proposes a tree rooted at seq.root, at most `depth` tokens deep and seq.room nodes big."""

    # propose() runs model forwards per drafted token: the goodput policy sets its depth before drafting
    drafts_with_model: bool = False
    # propose() writes the target's K/V at the sequence's slots from seq.cached on (layer-skip), so the
    # engine reserves depth + 1 of them first
    writes_target_kv: bool = False
    # the drafter picks its own length each step (DEL): it is offered SpecConfig.max_draft, not the
    # adaptive DraftLength (the guard and the goodput policy still cap it)
    plans_length: bool = False
    # its drafts carry a Draft.key (how good it thinks they are), by which the goodput policy keeps odds
    keyed: bool = False
    # residual streams (after how many layers) it reads at prompt rows, through observe_prefill()
    prefill_layers: tuple[int, ...] = ()

    def __init__(self, target, spec: SpecConfig):
        self.target = target  # forerun.models.runtime.Runtime
        self.spec = spec

    def begin(self, seq: Sequence) -> object | None:
        """Called once per sequence before its first draft; returns its per-request state."""
        return None

    def fork(self, parent: Sequence, child: Sequence) -> object | None:
        """A new sample of parent's request, at the same tokens: its own per-request state, or None to
        have begin(child) called at its first draft (the default)."""
        return None

    def end(self, seq: Sequence) -> None:
        """Called once when the sequence finishes or is aborted, before its state is dropped."""

    @abstractmethod
    def propose(self, seq: Sequence, depth: int) -> Draft: ...

    def layers_wanted(self, seq: Sequence) -> tuple[int, ...]:
        """Residual streams (after how many layers) the next verification should return for this
        sequence's rows, in Scores.layers (DEL's shadow tokens)."""
        return ()

    def observe_prefill(self, seq: Sequence, start: int, layers: dict[int, torch.Tensor]) -> None:
        """The target's residual streams (k -> [T, D], for k in prefill_layers) at the T prompt rows
        this step computed for seq, at positions start..start + T - 1: the prompt, or what a preempted
        sequence recomputes (then start lies before positions seen earlier, which it replaces). Rows a
        prefix-cache hit skipped are never computed, so never seen."""

    def observe(self, seq: Sequence, draft: Draft, verdict: Verdict, scores: Scores) -> None:
        """Feedback after verification; seq already holds the accepted tokens. scores holds the
        target's outputs at every node of the draft, rejected branches included, then at the M nodes
        of draft.extra."""


def room(seq: Sequence) -> int:
    """Nodes (tree plus extra) the next verification forward may hold for this sequence."""
    return seq.room


def root_only(seq: Sequence) -> Draft:
    """The empty draft: verification of the root alone is one autoregressive step."""
    return Draft(Tree(tokens=torch.tensor([seq.root]), parents=[-1]))


def chain(seq: Sequence, proposal: list[int], q=None) -> Draft:
    """A chain draft: root followed by `proposal`; q ([len+1, V]) as in Draft."""
    tokens = torch.tensor([seq.root, *proposal])
    return Draft(Tree(tokens=tokens, parents=list(range(-1, len(proposal)))), q=q)

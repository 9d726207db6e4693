"""The drafter interface: propose a token tree for each sequence, then observe how verification went.

The engine's speculation stage calls a drafter once a step for all its decoding sequences:
propose_batch(views, depths) before the forward, observe(seq, draft, verdict, scores) for each after
it. A drafter sees a sequence only through a SequenceView: what it may read of it (tokens, sampling,
room, the target's KV slots) and its own per-request state. One drafter object serves every
sequence of its SpecConfig, so what it knows lives in one of two places, and each strategy says which:

- Per request: what begin(seq) returns. The engine keeps it with the sequence (seq.draft_state),
  hands it back through the view at every call, and drops it when the sequence ends, after
  end(seq) releases what it holds. Examples: a draft model's KV cache (draft, rasd), lookahead's
  Jacobi window and n-gram pool, DEL's acceptance estimates per exit layer, pld's token array.
- Persistent: the drafter's own attributes, shared by all sequences of its SpecConfig and kept
  across requests on purpose, because they learn from everything the target says: STAND's n-gram
  tables and tree-shape statistics, Token Recycling's successor matrix, a retrieval datastore.
  (The engine also keeps per SpecConfig a SpeedGuard's measurements and the goodput policy's odds.)
Stateless ones (ar, retrieval, layer-skip) keep neither.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from forerun.config import SpecConfig
from forerun.tree import Tree
from forerun.types import Draft, Scores, Verdict


def _read(name: str, doc: str) -> property:
    return property(lambda view: getattr(view._seq, name), doc=doc)


class SequenceView:
    """What a drafter may see of a sequence being decoded, read through to the engine's sequence (so
    always current): everything is read-only but draft_state, the drafter's own per-request state.
    The engine makes one view per sequence, so a drafter may keep a view as a key."""

    __slots__ = ("_seq",)

    def __init__(self, seq) -> None:
        self._seq = seq  # forerun.engine.sequence.Sequence (not imported here: the engine imports drafters)

    tokens = _read("tokens", "list[int]: prompt + generated ids; tokens[-1] is the root. Not to be changed.")
    root = _read("root", "int: the newest token, not yet in the KV cache: the root of the next draft.")
    prompt_len = _read("prompt_len", "int: how many of tokens are the prompt.")
    params = _read("params", "SamplingParams: how the request samples.")
    generator = _read("generator", "torch.Generator | None: the sequence's random stream (None when greedy).")
    request_id = _read("request_id", "str: the request the sequence samples for.")
    index = _read("index", "int: which of its request's n samples.")
    room = _read("room", "int: nodes (tree plus extra) the next verification may hold, set each step.")
    cached = _read("cached", "int: tokens whose target K/V are cached: slots [0, cached).")
    accepted_ratio = _read("accepted_ratio", "float: recent drafts' acceptance over what the goodput policy "
                                             "expected (1 = as expected).")
    kv = _read("kv", "KVCache: the target's KV store, which slots() index (for drafters that write it).")

    def slots(self, lo: int, hi: int) -> torch.Tensor:
        """[hi - lo] long: the target KV store's slots of the sequence's positions [lo, hi)."""
        return self._seq.slots(lo, hi)

    @property
    def draft_state(self) -> object:
        """The drafter's per-request state (what begin() or fork() returned)."""
        return self._seq.draft_state

    @draft_state.setter
    def draft_state(self, state: object) -> None:
        self._seq.draft_state = state


# The name the drafters take the view's type by.
Sequence = SequenceView


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

    def begin(self, seq: SequenceView) -> object | None:
        """Called once per sequence before its first draft; returns its per-request state."""
        return None

    def fork(self, parent: SequenceView, child: SequenceView) -> object | None:
        """A new sample of parent's request, at the same tokens: its own per-request state, or None to
        have begin(child) called at its first draft (the default)."""
        return None

    def end(self, seq: SequenceView) -> None:
        """Called once when the sequence finishes or is aborted, before its state is dropped."""

    def propose_batch(self, seqs: list[SequenceView], depths: list[int]) -> list[Draft]:
        """A draft for each sequence, depths[i] >= 1 tokens deep at most: one step's drafting for all
        the decoding sequences of this drafter's SpecConfig. A drafter with a model forward per drafted
        token overrides this to run one forward per depth for them all; the default drafts each alone."""
        return [self.propose(seq, depth) for seq, depth in zip(seqs, depths)]

    @abstractmethod
    def propose(self, seq: SequenceView, depth: int) -> Draft: ...

    def layers_wanted(self, seq: SequenceView) -> tuple[int, ...]:
        """Residual streams (after how many layers) the next verification should return for this
        sequence's rows, in Scores.layers (DEL's shadow tokens)."""
        return ()

    def observe_prefill(self, seq: SequenceView, start: int, layers: dict[int, torch.Tensor]) -> None:
        """The target's residual streams (k -> [T, D], for k in prefill_layers) at the T prompt rows
        this step computed for seq, at positions start..start + T - 1: the prompt, or what a preempted
        sequence recomputes (then start lies before positions seen earlier, which it replaces). Rows a
        prefix-cache hit skipped are never computed, so never seen."""

    def observe(self, seq: SequenceView, draft: Draft, verdict: Verdict, scores: Scores) -> None:
        """Feedback after verification; seq already holds the accepted tokens. scores holds the
        target's outputs at every node of the draft, rejected branches included, then at the M nodes
        of draft.extra."""


def room(seq: SequenceView) -> int:
    """Nodes (tree plus extra) the next verification forward may hold for this sequence."""
    return seq.room


def root_only(seq: SequenceView) -> Draft:
    """The empty draft: verification of the root alone is one autoregressive step."""
    return Draft(Tree(tokens=torch.tensor([seq.root]), parents=[-1]))


def chain(seq: SequenceView, proposal: list[int], q=None) -> Draft:
    """A chain draft: root followed by `proposal`; q ([len+1, V]) as in Draft."""
    tokens = torch.tensor([seq.root, *proposal])
    return Draft(Tree(tokens=tokens, parents=list(range(-1, len(proposal)))), q=q)

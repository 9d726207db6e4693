"""One sequence of tokens being decoded: its tokens, its KV blocks, its drafter state and its stats."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from forerun.cache import KVCache
from forerun.config import SamplingParams, SpecConfig
from forerun.drafters.base import SequenceView
from forerun.logits_process import Processors
from forerun.types import Stats, TokenLogprob

SCORE_CHUNK = 512  # rows a scored sequence computes per step at most (each row's logits span the vocabulary)


@dataclass(eq=False)
class Scoring:
    """A sequence computed for its rows' log-probabilities (Engine.continuation_logprobs), never
    decoded: the row at each position from `start` on scores the token after it, up to the last token."""

    start: int  # the next position whose row is scored: the prefix cache may hold the rows before it
    top: int  # most likely tokens kept per position
    entries: list[TokenLogprob] = field(default_factory=list)


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: holds no KV blocks
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """tokens[-1] is the root of the next step: its K/V are not cached yet. KV slots [0, cached) of
    the sequence (logical slot i is `block_size * blocks[i // block_size] + i % block_size` in the
    pool) hold tokens[:cached]; tokens[cached:] are pending (a prompt not yet prefilled, or all of a
    preempted sequence's tokens), and each step feeds them in before the root."""

    tokens: list[int]  # prompt + generated tokens
    prompt_len: int
    params: SamplingParams
    spec: SpecConfig = field(default_factory=SpecConfig)
    generator: torch.Generator | None = None
    eos_ids: frozenset[int] = frozenset()
    stop_ids: frozenset[int] = frozenset()  # params.stop_token_ids as a set: checked for every new token
    id: int = 0
    request_id: str = ""
    index: int = 0  # which of its request's n samples
    kv: KVCache | None = None  # the pool's store, which its blocks index
    block_size: int = 16
    blocks: list[int] = field(default_factory=list)
    cached: int = 0
    content_ids: list[int] = field(default_factory=list)  # prefix-cache ids of its first full blocks
    status: Status = Status.WAITING
    begun: bool = False  # the drafter's begin() has run (at the sequence's first draft)
    draft_state: object = None  # the drafter's per-request state (Drafter.begin), dropped at the end
    length: object = None  # forerun.engine.draft_length.DraftLength
    room: int = 0  # draft nodes (tree plus extra) the next verification may hold, set each step
    last_draft: str = "plain"  # how its previous step went: "plain", or its draft accepted "all", "some", "none"
    draft_accepted: float = 0.0  # draft tokens accepted under the goodput policy (recent drafts weigh most)...
    draft_expected: float = 0.0  # ... and how many its odds expected of the same drafts
    stats: Stats = field(default_factory=Stats)
    arrival: float = 0.0
    output: list[int] = field(default_factory=list)  # ids emitted so far (EOS, limits, stops applied)
    logprobs: list = field(default_factory=list)  # TokenLogprob per output id, when the request asks
    cumulative_logprob: float = 0.0  # of the output ids under the model, summed when best_of ranks samples
    stream: object = None  # forerun.stream.TextStream: stop strings, and text when it streams
    processors: Processors | None = None  # what processes its logits before verification; None: nothing
    text: list[str] = field(default_factory=list)  # streamed text not yet handed out
    finish_reason: str | None = None
    scoring: Scoring | None = None  # scored rather than decoded
    hold: bool = False  # computed up to its root, then handed to the caller undecoded (Engine.prefilled)

    @cached_property
    def view(self) -> SequenceView:
        """What its drafter sees of it: one view for the sequence's life."""
        return SequenceView(self)

    @property
    def root(self) -> int:
        return self.tokens[-1]

    @property
    def pending(self) -> int:
        """Tokens whose K/V the next forward computes before any draft: the root and any before it."""
        return len(self.tokens) - self.cached

    @property
    def reusable(self) -> int:
        """Leading tokens whose K/V may come from the prefix cache: all but the root, or for a scored
        sequence those before its first scored row (a cached row has no logits)."""
        return self.scoring.start if self.scoring is not None else len(self.tokens) - 1

    @property
    def accepted_ratio(self) -> float:
        """How this sequence's recent drafts fared against its SpecConfig's odds (1 = as expected), with
        one expected token of prior so a single step does not swing it."""
        return (self.draft_accepted + 1.0) / (self.draft_expected + 1.0)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def slots(self, lo: int, hi: int) -> Tensor:
        """[hi - lo] long: the pool slots of logical slots [lo, hi) (blocks must cover them)."""
        logical = torch.arange(lo, hi)
        table = torch.tensor(self.blocks, dtype=torch.long)
        return table[logical // self.block_size] * self.block_size + logical % self.block_size

"""The drafter interface: propose a token tree, then observe how verification went."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from forerun.cache import KVCache
from forerun.config import SamplingParams, SpecConfig
from forerun.types import Draft, Verdict


@dataclass(slots=True)
class Sequence:
    """One request's decoding state. tokens[-1] is the newest token; its K/V are not cached yet."""

    tokens: list[int]  # prompt + generated tokens
    prompt_len: int
    cache: KVCache  # the target's cache; slots [0, cached) hold tokens[:cached]
    cached: int
    params: SamplingParams
    generator: torch.Generator | None = None
    eos_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def root(self) -> int:
        return self.tokens[-1]


class Drafter(ABC):
    """Proposes a tree rooted at seq.root. `budget` is the draft depth the controller allows."""

    def __init__(self, target, spec: SpecConfig):
        self.target = target  # forerun.models.runtime.Runtime
        self.spec = spec

    def begin(self, seq: Sequence) -> None:
        """Called once per request, after prefill."""

    @abstractmethod
    def propose(self, seq: Sequence, budget: int) -> Draft: ...

    def observe(self, seq: Sequence, draft: Draft, verdict: Verdict, logits: torch.Tensor) -> None:
        """Feedback after verification; seq already holds the accepted tokens.
        logits: [N + M, V], the target's output at every node of the draft, rejected branches included,
        then at the M nodes of draft.extra (M = 0 without them)."""


def room(seq: Sequence) -> int:
    """Nodes (tree plus extra) the next verification forward may hold before the KV cache is full."""
    return seq.cache.max_len - seq.cached


def root_only(seq: Sequence) -> Draft:
    """The empty draft: verification of the root alone is one autoregressive step."""
    return Draft(tokens=torch.tensor([seq.root]), parents=[-1])


def chain(seq: Sequence, proposal: list[int], q=None) -> Draft:
    """A chain draft: root followed by `proposal`; q ([len+1, V]) as in Draft."""
    tokens = torch.tensor([seq.root, *proposal])
    return Draft(tokens=tokens, parents=list(range(-1, len(proposal))), q=q)

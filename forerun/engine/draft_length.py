"""How many tokens a sequence drafts each step: DraftLength (per sequence) and SpeedGuard (per
SpecConfig, kept across requests)."""
from __future__ import annotations

from forerun.backoff import Backoff
from forerun.config import SpecConfig


class SpeedGuard:
    """Keeps speculation from costing time (SpecConfig.guard): tracks the seconds per token of
    speculative steps and of plain steps (a drafter that proposed nothing, or a step it was not asked
    to draft), runs the cheaper kind, and now and then checks the other kind to keep both current.

    A check that confirms the choice doubles the wait before the next one (from CHECK_EVERY up to
    CHECK_MAX steps); one that overturns it starts again from CHECK_EVERY. So a 40-node tree that
    costs ten plain steps is retried rarely once it has lost a few times. The engine keeps one
    guard per SpecConfig across requests, so what it learned carries over, as the drafters' memories do.
    """

    CHECK_EVERY = 16
    CHECK_MAX = 512
    WEIGHT = 0.25  # of the newest step in the running per-token costs

    def __init__(self) -> None:
        self.cost: dict[bool, float | None] = {True: None, False: None}  # s/token: speculative, plain
        self.steps = 0
        self.checks = Backoff(self.CHECK_EVERY, self.CHECK_MAX)

    def prefers_speculation(self) -> bool:
        spec, plain = self.cost[True], self.cost[False]
        if spec is None:
            return True  # measure speculation first,
        if plain is None:
            return False  # then the plain baseline
        return spec <= plain

    def speculate(self) -> bool:
        """Whether this step should speculate."""
        prefer = self.prefers_speculation()
        return not prefer if self.checks.due(self.steps) else prefer

    def record(self, speculated: bool, seconds: float | None, tokens: int) -> None:
        """After a step it chose; seconds None: the step's time says nothing about decoding (it also
        computed a prompt chunk), so only the step is counted, and a check due then moves to the next."""
        if seconds is None:
            self.checks.postpone(self.steps)
            self.steps += 1
            return
        checking = self.checks.due(self.steps)
        before = self.prefers_speculation()
        old, per_token = self.cost[speculated], seconds / max(tokens, 1)
        # a check replaces the checked kind's cost: its last measurement may be hundreds of steps old
        fresh = old is None or checking
        self.cost[speculated] = per_token if fresh else (1 - self.WEIGHT) * old + self.WEIGHT * per_token
        if checking:
            self.checks.checked(self.steps, confirmed=self.prefers_speculation() == before)
        self.steps += 1


class DraftLength:
    """Speculation length per step: +2 after a fully accepted draft, -1 after a rejection; 0 (a plain
    step) when a SpeedGuard finds speculation the slower."""

    def __init__(self, spec: SpecConfig, guard: SpeedGuard | None = None):
        self.length = spec.num_draft
        self.ceiling = spec.max_draft
        self.adaptive = spec.adaptive
        self.guard = guard if guard is not None else SpeedGuard() if spec.guard else None

    @property
    def value(self) -> int:
        """Tokens to draft this step; 0 asks for a plain step."""
        if self.guard is None or self.guard.speculate():
            return self.length
        return 0

    def update(self, proposed: int, accepted: int, seconds: float | None = 0.0, tokens: int = 1) -> None:
        """After a step: its deepest draft node, the draft tokens accepted, the seconds it cost this
        sequence (None: not a measure of decoding, e.g. it also computed a prompt chunk) and the
        tokens it emitted."""
        if self.guard is not None:
            self.guard.record(proposed > 0, seconds, tokens)
        if not self.adaptive or proposed == 0:
            return
        if accepted == proposed:
            self.length = min(self.length + 2, self.ceiling)
        else:
            self.length = max(self.length - 1, 1)

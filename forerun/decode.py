"""The decoding loop: propose -> verify -> commit -> observe. Plain AR is the loop with the `ar` drafter."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from forerun.budget import TreeBudget
from forerun.config import SamplingParams, SpecConfig
from forerun.drafters.base import Drafter, Sequence, root_only
from forerun.sampling import target_probs
from forerun.tree import depths, is_chain, tree_mask
from forerun.types import Draft, Stats, Verdict
from forerun.verify import verify_greedy, verify_stochastic


class SpeedGuard:
    """Keeps speculation from costing time (SpecConfig.guard): tracks the seconds per token of
    speculative steps and of plain steps (a drafter that proposed nothing, or a step it was not asked
    to draft), runs the cheaper kind, and now and then checks the other kind to keep both current.

    A check that confirms the choice doubles the wait before the next one (from CHECK_EVERY up to
    CHECK_MAX steps); one that overturns it starts again from CHECK_EVERY. So a 40-node tree that
    costs ten plain steps is retried rarely once it has lost a few times. The LLM keeps one guard
    per SpecConfig across requests, so what it learned carries over, as the drafters' memories do.
    """

    CHECK_EVERY = 16
    CHECK_MAX = 512
    WEIGHT = 0.25  # of the newest step in the running per-token costs

    def __init__(self) -> None:
        self.cost: dict[bool, float | None] = {True: None, False: None}  # s/token: speculative, plain
        self.steps = 0
        self.interval = self.CHECK_EVERY
        self.next_check = self.CHECK_EVERY

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
        return not prefer if self.steps == self.next_check else prefer

    def record(self, speculated: bool, seconds: float, tokens: int) -> None:
        checking = self.steps == self.next_check
        before = self.prefers_speculation()
        old, per_token = self.cost[speculated], seconds / max(tokens, 1)
        # a check replaces the checked kind's cost: its last measurement may be hundreds of steps old
        fresh = old is None or checking
        self.cost[speculated] = per_token if fresh else (1 - self.WEIGHT) * old + self.WEIGHT * per_token
        if checking:
            confirmed = self.prefers_speculation() == before
            self.interval = min(2 * self.interval, self.CHECK_MAX) if confirmed else self.CHECK_EVERY
            self.next_check = self.steps + self.interval
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

    def update(self, proposed: int, accepted: int, seconds: float = 0.0, tokens: int = 1) -> None:
        if self.guard is not None:
            self.guard.record(proposed > 0, seconds, tokens)
        if not self.adaptive or proposed == 0:
            return
        if accepted == proposed:
            self.length = min(self.length + 2, self.ceiling)
        else:
            self.length = max(self.length - 1, 1)


def verify(draft: Draft, logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> Verdict:
    if params.greedy:
        return verify_greedy(draft, logits)
    return verify_stochastic(draft, target_probs(logits.cpu(), params), generator)


def target_forward(target, seq: Sequence, draft: Draft) -> torch.Tensor:
    """One forward of the target over the whole draft tree, then its extra nodes if any;
    returns [N + M, V] logits (M = 0 without extra nodes)."""
    device, extra = target.device, draft.extra
    tokens, depth = draft.tokens, torch.tensor(depths(draft.parents))
    mask = None if is_chain(draft.parents) else tree_mask(draft.parents)
    if extra is not None:
        m = extra.tokens.shape[0]
        tree = tree_mask(draft.parents) if mask is None else mask
        mask = torch.cat([torch.nn.functional.pad(tree, (0, m)), extra.mask])  # [N + M, N + M]
        tokens, depth = torch.cat([tokens, extra.tokens]), torch.cat([depth, extra.depths])
    return target.model(tokens.to(device), seq.cached + depth.to(device), seq.cache, seq.cached,
                        None if mask is None else mask.to(device))


def step(target, seq: Sequence, drafter: Drafter, length: DraftLength, stats: Stats,
         fit: TreeBudget | None = None) -> list[int]:
    """One speculative step. Returns the tokens it appended to seq (accepted drafts + next token).
    `fit` cuts the draft to the nodes worth verifying (SpecConfig.budget = "cost")."""
    t0 = time.perf_counter()
    depth = length.value
    draft = drafter.propose(seq, depth) if depth else root_only(seq)
    if fit is not None:
        draft = fit.cut(draft, seq.params.greedy)
    t1 = time.perf_counter()
    logits = target_forward(target, seq, draft)
    verdict = verify(draft, logits[:draft.size], seq.params, seq.generator)
    seq.cache.commit(seq.cached, torch.tensor(verdict.path))
    new = draft.tokens[verdict.path[1:]].tolist() + [verdict.next_token]
    seq.tokens.extend(new)
    seq.cached += len(verdict.path)
    drafter.observe(seq, draft, verdict, logits)
    t2 = time.perf_counter()
    length.update(max(depths(draft.parents)), verdict.accepted, t2 - t0, len(new))
    if fit is not None:
        fit.record(draft, verdict, t2 - t0)
    stats.draft_s += t1 - t0
    stats.verify_s += t2 - t1
    stats.target_forwards += 1
    stats.accept_histogram[len(new)] += 1
    return new


@torch.inference_mode()
def decode(target, seq: Sequence, drafter: Drafter, spec: SpecConfig,
           on_tokens: Callable[[list[int]], bool] | None = None,
           guard: SpeedGuard | None = None, fit: TreeBudget | None = None) -> tuple[list[int], str, Stats]:
    """Run steps until EOS, the token limit, or `on_tokens` (fed each step's new tokens) returns True.
    Returns (generated token ids, finish reason, stats); ids stop before EOS and at the limit.
    `guard` and `fit` carry a SpeedGuard and a TreeBudget across calls (with spec.guard and
    spec.budget == "cost"; fresh ones otherwise)."""
    params = seq.params
    stats = Stats(prompt_tokens=seq.prompt_len)
    length = DraftLength(spec, guard)
    if fit is None and spec.budget == "cost":
        fit = TreeBudget()
    start = time.perf_counter()
    drafter.begin(seq)
    out: list[int] = []
    reason = "length"
    while len(out) < params.max_new_tokens:
        new = step(target, seq, drafter, length, stats, fit)[: params.max_new_tokens - len(out)]
        eos_at = next((i for i, t in enumerate(new) if t in seq.eos_ids), None)
        if eos_at is not None and not params.ignore_eos:
            new, reason = new[:eos_at], "eos"
        out.extend(new)
        if on_tokens is not None and on_tokens(new):
            reason = "stop"
        if reason != "length":
            break
    stats.new_tokens = len(out)
    stats.wall_s = time.perf_counter() - start
    return out, reason, stats

"""The decoding loop: propose -> verify -> commit -> observe. Plain AR is the loop with the `ar` drafter."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from forerun.config import SamplingParams, SpecConfig
from forerun.drafters.base import Drafter, Sequence
from forerun.sampling import target_probs
from forerun.tree import depths, is_chain, tree_mask
from forerun.types import Draft, Stats, Verdict
from forerun.verify import verify_greedy, verify_stochastic


class DraftLength:
    """Adaptive speculation length: +2 after a fully accepted draft, -1 after a rejection."""

    def __init__(self, spec: SpecConfig):
        self.value = spec.num_draft
        self.ceiling = spec.max_draft
        self.adaptive = spec.adaptive

    def update(self, proposed: int, accepted: int) -> None:
        if not self.adaptive or proposed == 0:
            return
        if accepted == proposed:
            self.value = min(self.value + 2, self.ceiling)
        else:
            self.value = max(self.value - 1, 1)


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


def step(target, seq: Sequence, drafter: Drafter, length: DraftLength, stats: Stats) -> list[int]:
    """One speculative step. Returns the tokens it appended to seq (accepted drafts + next token)."""
    t0 = time.perf_counter()
    draft = drafter.propose(seq, length.value)
    t1 = time.perf_counter()
    logits = target_forward(target, seq, draft)
    verdict = verify(draft, logits[:draft.size], seq.params, seq.generator)
    seq.cache.commit(seq.cached, torch.tensor(verdict.path))
    new = draft.tokens[verdict.path[1:]].tolist() + [verdict.next_token]
    seq.tokens.extend(new)
    seq.cached += len(verdict.path)
    drafter.observe(seq, draft, verdict, logits)
    length.update(max(depths(draft.parents)), verdict.accepted)
    stats.draft_s += t1 - t0
    stats.verify_s += time.perf_counter() - t1
    stats.target_forwards += 1
    stats.accept_histogram[len(new)] += 1
    return new


@torch.inference_mode()
def decode(target, seq: Sequence, drafter: Drafter, spec: SpecConfig,
           on_tokens: Callable[[list[int]], bool] | None = None) -> tuple[list[int], str, Stats]:
    """Run steps until EOS, the token limit, or `on_tokens` (fed each step's new tokens) returns True.
    Returns (generated token ids, finish reason, stats); ids stop before EOS and at the limit."""
    params = seq.params
    stats = Stats(prompt_tokens=seq.prompt_len)
    length = DraftLength(spec)
    start = time.perf_counter()
    drafter.begin(seq)
    out: list[int] = []
    reason = "length"
    while len(out) < params.max_new_tokens:
        new = step(target, seq, drafter, length, stats)[: params.max_new_tokens - len(out)]
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

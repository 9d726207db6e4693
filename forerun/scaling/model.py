"""The engine's log-probability API, in one place: per-token log-probabilities of sampled tokens
(SamplingParams.logprobs, Generation.logprobs) and LLM.score, which returns
log p(continuation[j] | prompt + continuation[:j]) for every j from one forward that reuses cached
prefix blocks."""
from __future__ import annotations

import contextlib

from forerun.config import SamplingParams
from forerun.scaling.types import Account
from forerun.types import Generation


def sampling_params(logprobs: bool = False, **kw) -> SamplingParams:
    """SamplingParams, asking for each sampled token's log-probability when `logprobs`."""
    if logprobs:
        kw["logprobs"] = 0
    return SamplingParams(**kw)


def grown_logprobs(before: tuple[float, ...] | None, g: Generation, wanted: bool) -> tuple[float, ...] | None:
    """A branch's token log-probabilities after it grows by g (None when not asked for)."""
    if not wanted:
        return None
    new = token_logprobs(g)
    return new if before is None else before + new


def token_logprobs(g: Generation) -> tuple[float, ...]:
    """The raw model's log-probability of each sampled token of g."""
    if g.logprobs is None:
        raise ValueError("the generation carries no log-probabilities (ask with SamplingParams(logprobs=0))")
    return tuple(t.logprob for t in g.logprobs)


class ModelScore:
    """log p(continuation | prompt) per token from an LLM, counted in an account. `lock` (an
    EngineDriver's) serializes the forward with other threads' engine steps. Scores are deterministic,
    so with a `kept` dict (shared by the threads' scorers) a repeated one is not computed again; it
    still counts in the account as the forward it cost when computed."""

    def __init__(self, llm, account: Account, lock=None, kept: dict | None = None):
        self.llm, self.account, self.lock, self.kept = llm, account, lock or contextlib.nullcontext(), kept

    def __call__(self, prompt_ids: list[int], continuation_ids: list[int]) -> list[float]:
        if not continuation_ids:
            raise ValueError("nothing to score: the continuation is empty")
        self.account.score_forwards += 1
        self.account.scored_tokens += len(continuation_ids)
        key = (tuple(prompt_ids), tuple(continuation_ids))
        if self.kept is not None and key in self.kept:
            return self.kept[key]
        with self.lock:
            scores = self.llm.score(list(prompt_ids), list(continuation_ids))
        if self.kept is not None:
            self.kept[key] = scores
        return scores

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode(text, add_bos=False)

    def prompt(self, text: str) -> list[int]:
        return self.llm.encode(text)

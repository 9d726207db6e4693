"""Where continuations come from. A strategy asks a Generator to extend branches (n samples each,
optionally up to a step delimiter); EngineGenerator submits them to forerun's engine as one batch, so
every continuation of a branch forks from one prefill and branches that share a prefix share its KV
through the prefix cache.
"""
from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from forerun.config import SpecConfig
from forerun.scaling.model import sampling_params, token_logprobs
from forerun.scaling.types import Account, Branch, Query
from forerun.types import Generation


class Generator(Protocol):
    account: Account  # grows with every call

    def query(self, question: str) -> Query:
        ...

    def extend(self, query: Query, requests: list[tuple[Branch, int]], stop: str | None,
               max_new_tokens: int | None = None) -> list[list[Branch]]:
        """For each (branch, n): n continuations of the branch, each up to and including `stop`
        (then unfinished) or to its end (finished). All requests decode together."""
        ...


class EngineGenerator:
    """A Generator on an LLM's engine. Each request's seed derives from (seed, the question, how many
    calls for that question came before), so a question's samples repeat whatever ran before it."""

    def __init__(self, llm, temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 256,
                 seed: int = 0, spec: SpecConfig | None = None, logprobs: bool = False, chat: bool | None = None):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.llm, self.temperature, self.top_p = llm, temperature, top_p
        self.max_new_tokens, self.seed, self.logprobs, self.chat = max_new_tokens, seed, logprobs, chat
        self.spec = spec or SpecConfig(method="ar")
        self.account = Account()
        self._calls: dict[int, int] = {}  # question key -> extend() calls so far

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def query(self, question: str) -> Query:
        return Query(question, tuple(self.llm.encode(question, chat=self.chat)))

    def extend(self, query: Query, requests: list[tuple[Branch, int]], stop: str | None,
               max_new_tokens: int | None = None) -> list[list[Branch]]:
        if not requests:
            return []
        if stop is not None and self.tokenizer is None:
            raise ValueError("step delimiters need a model with a tokenizer")
        engine, start, steps = self.llm.engine, time.perf_counter(), self.llm.engine.steps
        limit = max_new_tokens or self.max_new_tokens
        ids = []
        call = self._calls[query.key] = self._calls.get(query.key, 0) + 1
        try:
            for i, (branch, n) in enumerate(requests):
                seed = _seed(self.seed, query.key, call, i)
                params = sampling_params(temperature=self.temperature, top_p=self.top_p, seed=seed,
                                         max_new_tokens=limit, stop=(stop,) if stop else (), n=n,
                                         logprobs=self.logprobs)
                ids.append(engine.add_request(list(query.prompt_ids) + list(branch.token_ids), params, self.spec))
            done = self._run(set(ids))
        finally:
            for request_id in ids:
                engine.abort(request_id)
        self.account.engine_steps += engine.steps - steps
        self.account.requests += len(ids)
        self.account.wall_s += time.perf_counter() - start
        return [[self._grow(branch, g, stop) for g in done[rid]] for (branch, _), rid in zip(requests, ids)]

    def _run(self, waiting_for: set[str]) -> dict[str, tuple[Generation, ...]]:
        done = {}
        while waiting_for - done.keys():
            for out in self.llm.engine.step():
                if out.finished:
                    done[out.request_id] = out.generations
        return done

    def _grow(self, branch: Branch, g: Generation, stop: str | None) -> Branch:
        s = self.account
        s.generated_tokens += g.stats.new_tokens
        s.prefill_tokens += g.stats.prefill_tokens
        s.cached_tokens += g.stats.cached_tokens
        s.target_forwards += g.stats.target_forwards
        logprobs = token_logprobs(g) if self.logprobs else None
        if logprobs is not None and branch.logprobs is not None:
            logprobs = branch.logprobs + logprobs
        if g.finish_reason == "stop" and stop is not None:
            # The engine keeps the ids up to the delimiter's start (the last may hold part of it):
            # the step's text is re-encoded with the delimiter, so the text and the ids agree.
            step = g.text + stop
            new_ids = tuple(self.tokenizer.encode(step, add_bos=False))
            return Branch(branch.token_ids + new_ids, branch.text + step, False, branch.steps + 1, logprobs)
        return Branch(branch.token_ids + tuple(g.token_ids), branch.text + g.text, True, branch.steps + 1, logprobs)


def _seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] % 2**63)

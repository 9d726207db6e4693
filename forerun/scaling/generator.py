"""Where continuations come from. A strategy asks a Generator to extend branches (n samples each,
optionally up to a step delimiter); EngineGenerator submits them to forerun's engine as one batch, so
every continuation of a branch forks from one prefill and branches that share a prefix share its KV
through the prefix cache.

Several questions can be answered at once: each thread holds its own generator (clone(), so its own
account) and they share one EngineDriver, which lets whichever thread is waiting run the engine's
next step for all of them.
"""
from __future__ import annotations

import threading
import time
from typing import Protocol

import numpy as np

from forerun.config import SpecConfig
from forerun.scaling.model import grown_logprobs, sampling_params
from forerun.scaling.types import Account, Branch, Query
from forerun.types import Generation


class Generator(Protocol):
    account: Account  # grows with every call

    def query(self, question: str, problem_id: str = "") -> Query:
        ...

    def extend(self, query: Query, requests: list[tuple[Branch, int]], stop: str | None,
               max_new_tokens: int | None = None) -> list[list[Branch]]:
        """For each (branch, n): n continuations of the branch, each up to and including `stop`
        (then unfinished) or to its end (finished). All requests decode together."""
        ...


class EngineDriver:
    """One engine shared by threads. A thread submits its requests, then waits for them; while it waits
    it runs the engine's next step itself (one thread at a time), and every request finished by
    anyone's step is handed to the thread that submitted it."""

    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()  # held for every call into the engine (add, step, abort, score)
        self._done: dict[str, tuple[Generation, ...]] = {}

    def add(self, prompt_ids: list[int], params, spec: SpecConfig) -> str:
        with self.lock:
            return self.engine.add_request(prompt_ids, params, spec)

    def wait(self, request_ids: set[str]) -> dict[str, tuple[Generation, ...]]:
        while True:
            with self.lock:
                if request_ids <= self._done.keys():
                    return {rid: self._done.pop(rid) for rid in request_ids}
                for out in self.engine.step():
                    if out.finished:
                        self._done[out.request_id] = out.generations
            time.sleep(0)  # let threads blocked on the lock submit their requests before the next step

    def abort(self, request_ids: list[str]) -> None:
        with self.lock:
            for rid in request_ids:
                self.engine.abort(rid)
                self._done.pop(rid, None)


class EngineGenerator:
    """A Generator on an LLM's engine.

    Each request's seed derives from (seed, the problem: its id, else the question's text, how many
    extend() calls this answer made before it: query() starts the count), so a problem's samples depend
    on nothing that ran before or beside it, not even another problem asking the same question. A
    request therefore repeats exactly for the same tokens, stop, limit and seed, and the generator
    keeps what it returned: a budget-4 vote after a budget-16 vote of the same problem
    gets the first 4 of those 16 samples without decoding them again (sample i of a request does not
    depend on how many were asked for, nor on what else shares the batch: the engine is
    batch-invariant; under a speculative method whose outputs can vary with load they are still exact
    samples of the same distribution). Their account still counts what they cost when decoded
    (tokens, target forwards, prefill) and `replayed` how many came from the keep; wall time and
    engine steps are what actually ran."""

    def __init__(self, llm, temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 256,
                 seed: int = 0, spec: SpecConfig | None = None, logprobs: bool = False, chat: bool | None = None,
                 driver: EngineDriver | None = None, keep: bool = True):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.llm, self.temperature, self.top_p = llm, temperature, top_p
        self.max_new_tokens, self.seed, self.logprobs, self.chat = max_new_tokens, seed, logprobs, chat
        self.spec = spec or SpecConfig(method="ar")
        self.driver = driver or EngineDriver(llm.engine)
        self.account = Account()
        self._calls: dict[int, int] = {}  # problem key -> extend() calls since query() (shared by clones)
        self._kept: dict[tuple, tuple[Generation, ...]] = {}  # samples by request (shared by clones)
        self.keep = keep  # False: every request decodes (a timed comparison must pay for every sample)

    def clone(self) -> "EngineGenerator":
        """A generator for another thread: the same engine, settings and kept samples, its own account."""
        twin = object.__new__(EngineGenerator)
        twin.__dict__.update(self.__dict__)
        twin.account = Account()
        return twin

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def query(self, question: str, problem_id: str = "") -> Query:
        """Start answering a problem (its extend() calls count from here)."""
        query = Query(question, tuple(self.llm.encode(question, chat=self.chat)), problem_id)
        self._calls[query.key] = 0
        return query

    def extend(self, query: Query, requests: list[tuple[Branch, int]], stop: str | None,
               max_new_tokens: int | None = None) -> list[list[Branch]]:
        if not requests:
            return []
        if stop is not None and self.tokenizer is None:
            raise ValueError("step delimiters need a model with a tokenizer")
        start, steps = time.perf_counter(), self.llm.engine.steps
        limit = max_new_tokens or self.max_new_tokens
        call = self._calls[query.key] = self._calls.get(query.key, 0) + 1
        seeds = [derive_seed(self.seed, query.key, call, i) for i in range(len(requests))]
        keys = [self._keep_key(query, branch, stop, limit, seed) for (branch, _), seed in zip(requests, seeds)]
        done: dict[int, tuple[Generation, ...]] = {}
        for i, key in enumerate(keys):  # samples kept from an identical request, as many as it asks
            if self.keep and len(self._kept.get(key, ())) >= requests[i][1]:
                done[i] = self._kept[key][:requests[i][1]]
                self.account.replayed += len(done[i])
        ids = {}
        try:
            for i, ((branch, n), seed) in enumerate(zip(requests, seeds)):
                if i in done:
                    continue
                params = sampling_params(temperature=self.temperature, top_p=self.top_p, seed=seed,
                                         max_new_tokens=limit, stop=(stop,) if stop else (), n=n,
                                         logprobs=self.logprobs)
                ids[i] = self.driver.add(list(query.prompt_ids) + list(branch.token_ids), params, self.spec)
            finished = self.driver.wait(set(ids.values())) if ids else {}
        finally:
            self.driver.abort(list(ids.values()))
        for i, rid in ids.items():
            done[i] = finished[rid]
            if self.keep:
                self._kept[keys[i]] = done[i]
        self.account.engine_steps += self.llm.engine.steps - steps
        self.account.requests += len(ids)
        self.account.wall_s += time.perf_counter() - start
        return [[self._grow(branch, g, stop) for g in done[i]] for i, (branch, _) in enumerate(requests)]

    @staticmethod
    def _keep_key(query: Query, branch: Branch, stop: str | None, limit: int, seed: int) -> tuple:
        """What makes a request's samples repeat: the same tokens, stop, limit and seed."""
        return (query.prompt_ids + branch.token_ids, stop, limit, seed)

    def _grow(self, branch: Branch, g: Generation, stop: str | None) -> Branch:
        self.account.count(g.stats)
        logprobs = grown_logprobs(branch.logprobs, g, self.logprobs)
        if g.finish_reason == "stop" and stop is not None:
            # The engine keeps the ids up to the delimiter's start (the last may hold part of it):
            # the step's text is re-encoded with the delimiter, so the text and the ids agree.
            step = g.text + stop
            new_ids = tuple(self.tokenizer.encode(step, add_bos=False))
            return Branch(branch.token_ids + new_ids, branch.text + step, False, branch.steps + 1, logprobs)
        return Branch(branch.token_ids + tuple(g.token_ids), branch.text + g.text, True, branch.steps + 1, logprobs)


def derive_seed(*entropy: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence): the same entropy, the same seed."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] % 2**63)

"""Inference-time scaling on the server: a chat request's `scaling` object runs one of forerun.scaling's
strategies on the server's own engine, and the answer is the candidate the strategy chose.

    event loop (the handler)          the strategy's thread: solve()          engine thread
    answer() --- a worker thread -->  generator.extend --- a Job ---------->  submit, steps, outputs
                                      scorer (ModelScore).score --- call -->  engine.score
    client gone: generator.cancel()   its waits raise Cancelled; the requests in flight are aborted

A strategy's run() is synchronous, so it runs in a thread of its own and blocks on coroutines it hands
to the event loop. Its samples are ordinary engine requests: batched with every other client's,
counted in /metrics, aborted when the client goes away. ScalingSlots bounds how many run at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import secrets
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
from fastapi import Request
from prometheus_client import Gauge

from forerun.config import SamplingParams, SpecConfig
from forerun.llm import LLM
from forerun.scaling.answers import extract_answer
from forerun.scaling.generator import derive_seed
from forerun.scaling.model import ModelScore, grown_logprobs
from forerun.scaling.run import solve
from forerun.scaling.scorers import SCORERS, build_scorer
from forerun.scaling.strategies import STRATEGIES, Solver, Strategy, build_strategy
from forerun.scaling.tasks import Task, build_task
from forerun.scaling.types import Account, Branch, Outcome, Query
from forerun.serve.errors import APIError, bad_request
from forerun.serve.jobs import Job, until_done_or_gone
from forerun.serve.protocol import ChatCompletionRequest, ChatMessage
from forerun.serve.requests import Served
from forerun.serve.worker import EngineWorker
from forerun.types import Generation

SERVED_SCORERS = tuple(s for s in SCORERS if s != "reward")  # `reward` loads a second model: not per request
RETRY_AFTER_S = 2  # what a refused scaling request is told to wait


class ScalingSlots:
    """At most `size` scaling strategies at once. Each holds a thread for its whole run, so they run
    in a pool of their own (`threads`): in anyio's shared pool, which FastAPI's sync work uses too,
    enough long strategies would stall every other request. One more is refused with a 429 and a
    Retry-After (which OpenAI clients honour), not queued without bound."""

    def __init__(self, size: int, running: Gauge):
        self.size, self.running = size, running
        self.claimed = 0
        self.threads = anyio.CapacityLimiter(size)

    @contextmanager
    def claim(self) -> Iterator[anyio.CapacityLimiter]:
        """A slot for one strategy (on the event loop, so no two requests can take the last one), and
        the thread pool to run it in."""
        if self.claimed >= self.size:
            raise APIError(429, f"this server already runs {self.size} scaling requests (--max-scaling-jobs); "
                           "retry shortly", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.claimed += 1
        self.running.inc()
        try:
            yield self.threads
        finally:
            self.claimed -= 1
            self.running.dec()


@dataclass(frozen=True)
class Plan:
    """A checked `scaling` object: the strategy and how its candidates are scored and read."""

    strategy: Strategy
    n: int
    reward: str | None
    answer_of: Callable[[str], str | None]
    delimiter: str
    max_steps: int


def plan(body: ChatCompletionRequest, served: Served) -> Plan:
    """Every check of a scaling request, each a 400 before anything is queued."""
    scaling = body.scaling
    if body.stream:
        raise bad_request("stream is not supported with scaling: the answer is known only once the strategy has "
                          "finished; send stream: false", param="stream")
    if body.n != 1:
        raise bad_request("n > 1 is not supported with scaling: the strategy returns one answer; its budget is "
                          "scaling.n", param="n")
    if body.logprobs:
        raise bad_request("logprobs are not supported with scaling", param="logprobs")
    if scaling.n > served.max_num_seqs:
        raise bad_request(f"scaling.n = {scaling.n} exceeds the {served.max_num_seqs} sequences this server "
                          "decodes at once (--max-num-seqs)", param="scaling.n")
    try:
        strategy = build_strategy(scaling.strategy, **scaling.options)
    except (TypeError, ValueError) as e:
        where = "scaling.strategy" if scaling.strategy not in STRATEGIES else "scaling.options"
        raise bad_request(f"{where}: {e}", param=where) from None
    _check_reward(scaling.reward, strategy)
    answer_of = extract_answer if scaling.task is None else _task(scaling.task).answer_of
    return Plan(strategy, scaling.n, scaling.reward, answer_of, scaling.delimiter, scaling.max_steps)


def _check_reward(reward: str | None, strategy: Strategy) -> None:
    if reward is None:
        if strategy.needs_scorer or getattr(strategy, "prune", None) is not None:  # adaptive prunes by score
            raise bad_request(f"strategy {strategy.name!r} needs a scorer: give scaling.reward, one of "
                              f"{', '.join(SERVED_SCORERS)}", param="scaling.reward")
    elif reward == "reward":
        raise bad_request("scaling.reward 'reward' (a separate reward model) is not served; choose one of "
                          f"{', '.join(SERVED_SCORERS)}", param="scaling.reward")
    elif reward not in SERVED_SCORERS:
        raise bad_request(f"unknown scaling.reward {reward!r}; choose one of {', '.join(SERVED_SCORERS)}",
                          param="scaling.reward")


@functools.cache
def _task(name: str) -> Task:
    try:
        return build_task(name)
    except (ValueError, FileNotFoundError) as e:
        raise bad_request(f"scaling.task: {e}", param="scaling.task") from None


def question_of(messages: list[ChatMessage]) -> str:
    """The question scorers quote: the last user message."""
    return next((m.text() for m in reversed(messages) if m.role == "user"), messages[-1].text())


@dataclass(frozen=True)
class Answer:
    """What the response is made of."""

    outcome: Outcome
    text: str  # the chosen candidate's ("" when the strategy finished no solution)
    finish_reason: str  # the engine's, of the chosen candidate's last sample


async def answer(worker: EngineWorker, request: Request, plan: Plan, question: str, prompt: list[int],
                 params: SamplingParams, spec: SpecConfig, tokenizer, threads: anyio.CapacityLimiter) -> Answer:
    """Run the plan's strategy on the prompt, in a thread that `threads` lends; each engine request
    samples with `params` (n and the seed set per request). Ends early, aborting what is in flight, if
    the client goes away."""
    if params.seed is None:  # every sample's seed derives from this one
        params = dataclasses.replace(params, seed=secrets.randbits(63))
    generator = ServedGenerator(worker, Query(question, tuple(prompt)), params, spec, tokenizer)
    scorer = build_scorer(plan.reward, ModelScore(generator, generator.account)) if plan.reward else None
    generator.logprobs = scorer is not None and scorer.needs_logprobs
    solver = Solver(generator, plan.answer_of, scorer, plan.delimiter, plan.max_steps, params.seed)
    work = asyncio.ensure_future(anyio.to_thread.run_sync(solve, plan.strategy, solver, question, plan.n,
                                                          limiter=threads))
    try:
        await until_done_or_gone(work, request)
    finally:
        if not work.done():
            generator.cancel()
    try:
        outcome = await work
    except Cancelled:
        raise APIError(499, "the client closed the request", code="client_closed_request") from None
    except (TypeError, ValueError) as e:  # a strategy's option (its value or type) that fails only as it runs
        raise bad_request(f"scaling: {e}") from None
    chosen = outcome.chosen
    if chosen is None:
        return Answer(outcome, "", "length")
    return Answer(outcome, chosen.text, generator.finish_reasons.get(chosen.text, "stop"))


class Cancelled(Exception):
    """The client went away: the strategy stops at its next wait."""


class ServedGenerator:
    """A Generator (forerun.scaling.generator's protocol) for one chat request: each extend() is a Job
    of engine requests submitted through the worker. It is also the model ModelScore reads (tokenizer,
    encode, score), with score run on the engine thread. Its methods block: call them from the
    strategy's thread, never from the event loop."""

    encode = LLM.encode  # a scorer's prompt text -> ids, rendered as `forerun scale` renders it

    def __init__(self, worker: EngineWorker, query: Query, params: SamplingParams, spec: SpecConfig, tokenizer):
        self.worker, self.request_query, self.params, self.spec = worker, query, params, spec
        self.tokenizer = tokenizer
        self.logprobs = False  # each sampled token's log-probability, for the scorers that read them
        self.account = Account()
        self.finish_reasons: dict[str, str] = {}  # a finished branch's text -> its last sample's finish reason
        self._loop = asyncio.get_running_loop()
        self._calls = 0
        self._lock = threading.Lock()
        self._waiting: set[concurrent.futures.Future] = set()
        self._cancelled = False

    def query(self, question: str, problem_id: str = "") -> Query:
        """The request's query: its prompt is the whole conversation, whatever `question` says (one
        request answers one problem, so there is no other problem to keep apart)."""
        return self.request_query

    def extend(self, query: Query, requests: list[tuple[Branch, int]], stop: str | None,
               max_new_tokens: int | None = None) -> list[list[Branch]]:
        if not requests:
            return []
        steps = self.worker.engine.steps  # shared with the other clients' requests batched in the same steps
        self._calls += 1
        prompts = [list(query.prompt_ids) + list(branch.token_ids) for branch, _ in requests]
        params = [self._params(n, stop, max_new_tokens, i) for i, (_, n) in enumerate(requests)]
        done = self._wait(self._decode(prompts, params))
        self.account.engine_steps += self.worker.engine.steps - steps
        self.account.requests += len(requests)
        return [[self._grow(branch, g, stop) for g in generations]
                for (branch, _), generations in zip(requests, done)]

    def score(self, prompt_ids: list[int], continuation_ids: list[int]) -> list[float]:
        return self._wait(self.worker.call(lambda engine: engine.score(prompt_ids, continuation_ids)))

    def cancel(self) -> None:
        """From the event loop: stop the strategy's waits, now and from here on."""
        with self._lock:
            self._cancelled = True
            for future in self._waiting:
                future.cancel()

    def _params(self, n: int, stop: str | None, max_new_tokens: int | None, index: int) -> SamplingParams:
        """The request's sampling, for one extend request: its own seed from (seed, call, index)."""
        stops, include = self.params.stop, self.params.include_stop_str_in_output
        if stop is not None:  # the delimiter stays in the text: it tells a step from the request's stop strings
            stops, include = (stop, *stops), True
        return dataclasses.replace(self.params, n=n, seed=derive_seed(self.params.seed, self._calls, index), stop=stops,
                                   include_stop_str_in_output=include,
                                   max_new_tokens=max_new_tokens or self.params.max_new_tokens,
                                   logprobs=0 if self.logprobs else None)

    async def _decode(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[Generation, ...]]:
        job = Job(self.worker, prompts, params, self.spec)
        await job.start(stream_text=False)
        try:
            async for _ in job.events():
                pass
        finally:
            job.abort()  # what has not finished, when cancelled
        return [job.generations[i] for i in range(len(prompts))]

    def _wait(self, coroutine: Coroutine):
        """Run a coroutine on the event loop and block this (the strategy's) thread on its result."""
        with self._lock:
            if self._cancelled:
                coroutine.close()
                raise Cancelled
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
            self._waiting.add(future)
        try:
            return future.result()
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            raise Cancelled from None
        finally:
            with self._lock:
                self._waiting.discard(future)

    def _grow(self, branch: Branch, g: Generation, stop: str | None) -> Branch:
        self.account.count(g.stats)
        logprobs = grown_logprobs(branch.logprobs, g, self.logprobs)
        text = g.text
        if stop is not None and g.finish_reason == "stop":
            if text.endswith(stop):  # a step: its ids re-encoded with the delimiter, so text and ids agree
                ids = tuple(self.tokenizer.encode(text, add_bos=False))
                return Branch(branch.token_ids + ids, branch.text + text, False, branch.steps + 1, logprobs)
            if not self.params.include_stop_str_in_output:  # one of the request's stop strings ended it
                text = next((text[:-len(s)] for s in self.params.stop if text.endswith(s)), text)
        grown = Branch(branch.token_ids + tuple(g.token_ids), branch.text + text, True, branch.steps + 1, logprobs)
        self.finish_reasons[grown.text] = g.finish_reason
        return grown

"""The engine thread: the one thread that touches the Engine, which is not thread-safe.

    event loop (HTTP handlers)              engine thread
    worker.submit(...)  --- Add ------->    engine.add_request -> accepted / error
    async for out in stream   <--------    engine.step() outputs, one call_soon_threadsafe a step
    worker.abort(id)    --- Abort ----->    engine.abort: decoding stops, KV blocks freed at once
    await worker.call(fn) --- Call ---->    fn(engine) between two steps (a scorer's engine.score)

The thread loads the model first (the server answers 503 meanwhile), then loops: take every queued
command, run one step while any request is unfinished, hand each request its outputs, publish a
snapshot of the engine's queues and pool for /metrics. It sleeps on the command queue when idle.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from forerun.config import SamplingParams, SpecConfig
from forerun.engine.engine import Engine, RequestOutput, RequestsFailed
from forerun.engine.kv_pool import PoolBusy
from forerun.serve.drafts import DraftModels
from forerun.serve.errors import APIError, bad_request, unavailable
from forerun.serve.metrics import Metrics

log = logging.getLogger("forerun.serve")

# Distinct SpecConfigs the engine keeps a drafter (and its learned odds) for at once: a new one past
# this evicts the least recently used that no request is using; none idle is a 503 (retry).
MAX_SPEC_CONFIGS = 32


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """What /metrics reports of the engine, copied by the engine thread after each step."""

    running: int = 0  # sequences decoding
    waiting: int = 0  # sequences queued or preempted
    used_blocks: int = 0  # KV pool blocks held by sequences
    total_blocks: int = 0
    touched_bytes: int = 0  # of the KV pool blocks ever used: their pages are resident from then on
    prefix_queried_blocks: int = 0  # prompt blocks looked up in the prefix cache
    prefix_hit_blocks: int = 0  # ... and found there
    block_size: int = 16  # tokens a block holds
    preemptions: int = 0


class RequestStream:
    """One engine request seen from the event loop. Its RequestOutputs (or an error from the engine
    thread) go into `outputs`, a queue that several requests of one HTTP request may share."""

    def __init__(self, request_id: str, outputs: asyncio.Queue):
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self.outputs = outputs
        self.accepted: asyncio.Future[None] = self.loop.create_future()

    def put(self, item: RequestOutput | BaseException) -> None:
        """From the engine thread."""
        _call_soon(self.loop, self.outputs.put_nowait, item)

    def settle(self, error: BaseException | None) -> None:
        """From the engine thread: the request was queued (None) or refused (the error)."""
        _call_soon(self.loop, _settle, self.accepted, error)


def hand_over(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    """From the engine thread: a step's outputs, each into its stream's queue, in one wake-up of each
    event loop among the streams (a server has one) rather than one a request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
    for stream, item in items:
        by_loop.setdefault(stream.loop, []).append((stream.outputs, item))
    for loop, batch in by_loop.items():
        _call_soon(loop, _put_each, batch)


def _put_each(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for outputs, item in batch:
        outputs.put_nowait(item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


@dataclass(slots=True)
class _Add:
    stream: RequestStream
    prompt_ids: list[int]
    params: SamplingParams
    spec: SpecConfig
    stream_text: bool


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Call:
    fn: Callable[[Engine], object]
    result: concurrent.futures.Future


class _Stop:
    pass


@dataclass(slots=True)
class _Live:
    """A request in flight: where its outputs go, and its timing for the latency histograms."""

    stream: RequestStream
    spec: SpecConfig
    samples: int  # n, or best_of
    arrival: float
    n: int = 1  # choices asked for
    max_tokens: int = 0  # the request's cap on each choice's tokens
    finished: int = 0  # samples finished
    first_token: float | None = None  # of any sample
    sample_first: dict[int, float] = field(default_factory=dict)  # sample index -> its first token's time
    sample_tokens: dict[int, int] = field(default_factory=dict)  # sample index -> tokens so far

    @property
    def unfinished(self) -> int:
        return self.samples - self.finished


class EngineWorker:
    def __init__(self, load: Callable[[], Engine], metrics: Metrics, drafts: DraftModels,
                 default_spec: SpecConfig, on_failure: Callable[[str], None] | None = None):
        self._load = load
        self._drafts = drafts  # the allowed draft models, shared by the drafters that name them
        self._default_spec = default_spec  # the server's own configuration, never evicted
        self._spec_use: dict[SpecConfig, None] = {}  # configurations requests used, least recent first
        self._metrics = metrics
        self._on_failure = on_failure
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._thread = threading.Thread(target=self._main, name="forerun-engine", daemon=True)
        self._stopping = False
        self.engine: Engine | None = None
        self.ready = threading.Event()
        self.failed: str | None = None  # why loading failed
        self.snapshot = EngineSnapshot()

    # -- the event loop's side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def check_ready(self) -> None:
        if self.failed is not None:
            raise unavailable(self.failed)
        if not self.ready.is_set():
            raise unavailable("the model is loading")
        if not self._thread.is_alive():
            raise unavailable("the engine has stopped")

    async def submit(self, prompt_ids: list[int], params: SamplingParams, spec: SpecConfig,
                     request_id: str, stream_text: bool, outputs: asyncio.Queue) -> None:
        """Queue a request whose outputs go into `outputs`; returns once the engine took it, or
        raises the APIError it was refused with."""
        self.check_ready()
        stream = RequestStream(request_id, outputs)
        self._commands.put(_Add(stream, prompt_ids, params, spec, stream_text))
        await stream.accepted

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    async def call(self, fn: Callable[[Engine], object]):
        """fn(engine)'s result, run on the engine thread between two steps; its ValueError is a 400.
        Cancelled before the engine thread reaches it, it does not run."""
        self.check_ready()
        result = concurrent.futures.Future()
        self._commands.put(_Call(fn, result))
        return await asyncio.wrap_future(result)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the requests in flight, then end the thread (SIGTERM's drain)."""
        self._commands.put(_Stop())
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self.engine = self._load()
        except Exception as e:  # noqa: BLE001  (any load error is reported, and the server exits)
            if isinstance(e, (ValueError, FileNotFoundError)):  # a bad path or setting: the message says it all
                log.error("loading the model failed: %s", e)
            else:
                log.exception("loading the model failed")
            self.failed = f"the model failed to load: {type(e).__name__}: {e}"
            if self._on_failure is not None:
                self._on_failure(self.failed)
            return
        self._publish()
        self.ready.set()
        log.info("engine ready")
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001  (a bug here must not leave requests waiting forever)
            log.exception("the engine thread failed")
            self.failed = f"the engine thread failed: {type(e).__name__}: {e}"
            self._fail_live(APIError(500, self.failed, type="internal_error"))
            if self._on_failure is not None:
                self._on_failure(self.failed)
        self._refuse_late_commands()

    def _loop(self) -> None:
        while not (self._stopping and not self.engine.has_unfinished()):
            self._take_commands(wait=not self.engine.has_unfinished() and not self._stopping)
            if self.engine.has_unfinished():
                self._step()
            self._publish()

    def _take_commands(self, wait: bool) -> None:
        try:
            command = self._commands.get() if wait else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run_command(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run_command(self, command) -> None:
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            live = self._live.pop(command.request_id, None)
            if live is not None:
                self._metrics.count_finished("abort", live.unfinished)
        elif isinstance(command, _Call):
            self._call(command)
        elif isinstance(command, _Stop):
            self._stopping = True

    def _add(self, add: _Add) -> None:
        engine, stream = self.engine, add.stream
        if self._stopping:
            stream.settle(unavailable("the server is shutting down"))
            return
        try:
            if add.spec not in engine.drafters and len(engine.drafters) >= MAX_SPEC_CONFIGS \
                    and not self._evicted_a_spec():
                stream.settle(unavailable(f"all {MAX_SPEC_CONFIGS} speculation configurations this server keeps "
                                          "are in use; retry, or use one of theirs"))
                return
            self._spec_use.pop(add.spec, None)
            self._spec_use[add.spec] = None
            self._drafts.add_drafter(engine, add.spec)
            engine.add_request(add.prompt_ids, add.params, add.spec, request_id=stream.request_id,
                               stream_text=add.stream_text)
        except (ValueError, FileNotFoundError) as e:
            stream.settle(bad_request(str(e)))
            return
        except Exception as e:  # noqa: BLE001  (a drafter that fails to build must not end the thread)
            log.exception("adding request %s failed", stream.request_id)
            stream.settle(APIError(500, f"the engine could not take the request: {e}", type="internal_error"))
            return
        self._live[stream.request_id] = _Live(stream, add.spec, add.params.samples, time.perf_counter(),
                                              add.params.n, add.params.max_new_tokens)
        stream.settle(None)

    def _evicted_a_spec(self) -> bool:
        """Make room for one more configuration: forget the least recently used one that no request
        is using (the server's own is kept); False where every one is in use."""
        for spec in list(self._spec_use):
            if spec not in self.engine.drafters:  # its request failed before a drafter was kept
                del self._spec_use[spec]
            elif spec != self._default_spec and self.engine.forget(spec):
                del self._spec_use[spec]
                return True
        return False

    def _call(self, call: _Call) -> None:
        if not call.result.set_running_or_notify_cancel():
            return
        try:
            call.result.set_result(call.fn(self.engine))
        except PoolBusy as e:  # a retry can succeed: 503, which OpenAI clients retry by themselves
            call.result.set_exception(unavailable(str(e)))
        except ValueError as e:
            call.result.set_exception(bad_request(str(e)))
        except Exception as e:  # noqa: BLE001  (reported to the caller; the engine thread goes on)
            log.exception("a call on the engine thread failed")
            call.result.set_exception(APIError(500, f"the engine failed: {type(e).__name__}: {e}",
                                               type="internal_error"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except RequestsFailed as e:  # those requests alone: their constraint cannot go on
            for request_id, reason in e.failures.items():
                live = self._live.pop(request_id, None)
                if live is not None:
                    live.stream.put(bad_request(f"the request's constraint cannot be followed with this model's "
                                                f"vocabulary: {reason}"))
                    self._metrics.count_finished("error", live.unfinished)
            outputs = e.outputs
        except Exception as e:  # noqa: BLE001  (fail the requests in flight, keep serving)
            log.exception("engine step failed")
            self._fail_live(APIError(500, f"the engine failed: {type(e).__name__}: {e}", type="internal_error"))
            return
        now = time.perf_counter()
        handed: list[tuple[RequestStream, RequestOutput]] = []
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            self._time(live, out, now)
            if out.finished:
                del self._live[out.request_id]
                self._metrics.observe_finished(live.spec, out.generations, now - live.arrival, live.n, live.max_tokens)
            handed.append((live.stream, out))
        hand_over(handed)

    def _fail_live(self, error: APIError) -> None:
        """Abort every request in flight and hand each the error."""
        for request_id, live in self._live.items():
            self.engine.abort(request_id)
            live.stream.put(error)
            self._metrics.count_finished("error", live.unfinished)
        self._live.clear()

    def _time(self, live: _Live, out: RequestOutput, now: float) -> None:
        for sample in out.samples:
            i = sample.index
            if sample.token_ids and i not in live.sample_first:
                live.sample_first[i] = now
                if live.first_token is None:
                    live.first_token = now
                    self._metrics.ttft.observe(now - live.arrival)
            live.sample_tokens[i] = live.sample_tokens.get(i, 0) + len(sample.token_ids)
            if sample.finish_reason is not None:
                live.finished += 1
                if live.sample_tokens[i] > 1:
                    self._metrics.tpot.observe((now - live.sample_first[i]) / (live.sample_tokens[i] - 1))

    def _publish(self) -> None:
        engine = self.engine
        pool, scheduler = engine.pool, engine.scheduler
        self.snapshot = EngineSnapshot(
            running=len(scheduler.running), waiting=len(scheduler.waiting), used_blocks=pool.used,
            total_blocks=pool.num_blocks, touched_bytes=pool.touched_bytes, prefix_queried_blocks=pool.queried_blocks,
            prefix_hit_blocks=pool.hit_blocks, block_size=pool.block_size, preemptions=scheduler.preemptions)

    def _refuse_late_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                command.stream.settle(unavailable("the server is shutting down"))
            elif isinstance(command, _Call) and command.result.set_running_or_notify_cancel():
                command.result.set_exception(unavailable("the server is shutting down"))

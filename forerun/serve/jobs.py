"""The engine requests of one HTTP request, seen from the event loop: submitted through the worker,
drained as the engine thread hands back their outputs, aborted if the client goes away first."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from forerun.config import SamplingParams, SpecConfig
from forerun.engine.output import RequestOutput, SampleOutput
from forerun.serve import responses as rs
from forerun.serve.worker import EngineWorker
from forerun.types import Generation


class Job:
    """The engine requests of one HTTP request (or of one round of a scaling strategy): one per prompt,
    each of its params' n samples. In a completion every prompt has the same n, and choice index =
    prompt index * n + sample index. Whatever has not finished when the job ends (a disconnect, an
    error) is aborted, which frees its KV at once."""

    def __init__(self, worker: EngineWorker, prompts: list[list[int]], params: list[SamplingParams],
                 spec: SpecConfig):
        self.worker, self.prompts, self.params, self.spec = worker, prompts, params, spec
        self.n = params[0].n
        base = rs.new_id("req")
        self.ids = [f"{base}-{i}" for i in range(len(prompts))]
        self.prompt_of = {rid: i for i, rid in enumerate(self.ids)}
        self.outputs: asyncio.Queue = asyncio.Queue()
        self.unfinished: set[str] = set()
        self.generations: dict[int, tuple[Generation, ...]] = {}

    async def start(self, stream_text: bool) -> None:
        submits = [self.worker.submit(ids, p, self.spec, rid, stream_text, self.outputs)
                   for ids, p, rid in zip(self.prompts, self.params, self.ids)]
        results = await asyncio.gather(*submits, return_exceptions=True)
        self.unfinished = {rid for rid, r in zip(self.ids, results) if r is None}
        error = next((r for r in results if r is not None), None)
        if error is not None:
            self.abort()
            raise error

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) until every request finished. Outputs of several steps that are
        waiting together (the event loop fell behind the engine) come as one output a request."""
        while self.unfinished:
            ready = [await self.outputs.get()]
            while not self.outputs.empty():
                ready.append(self.outputs.get_nowait())
            error = next((i for i, item in enumerate(ready) if isinstance(item, BaseException)), None)
            for item in coalesced(ready[:error]):
                if item.finished:
                    self.unfinished.discard(item.request_id)
                    self.generations[self.prompt_of[item.request_id]] = item.generations
                yield self.prompt_of[item.request_id], item
            if error is not None:
                raise ready[error]

    async def finish(self, request: Request) -> list[Generation]:
        """Every choice's generation, in index order; aborts if the client goes away first."""
        async def drain():
            async for _ in self.events():
                pass

        done = asyncio.ensure_future(drain())
        try:
            await until_done_or_gone(done, request)
        finally:
            if not done.done():
                done.cancel()
                self.abort()
        if done.done() and not done.cancelled():  # a cancel only takes effect at the task's next step
            done.result()  # raises the engine's error, if any
        return self.choices()

    def choices(self) -> list[Generation]:
        return [g for i in range(len(self.prompts)) for g in self.generations.get(i, ())]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def abort(self) -> None:
        for rid in self.unfinished:
            self.worker.abort(rid)
        self.unfinished.clear()


def coalesced(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """One output a request for several steps' outputs, in order: each sample's new tokens, text and
    logprobs joined, its finish reason the last step's."""
    by_request: dict[str, list[RequestOutput]] = {}
    for out in outputs:
        by_request.setdefault(out.request_id, []).append(out)
    return [outs[0] if len(outs) == 1 else _joined(outs) for outs in by_request.values()]


def _joined(outs: list[RequestOutput]) -> RequestOutput:
    by_sample: dict[int, list[SampleOutput]] = {}
    for out in outs:
        for sample in out.samples:
            by_sample.setdefault(sample.index, []).append(sample)
    samples = [parts[0] if len(parts) == 1 else SampleOutput(
        index, [t for p in parts for t in p.token_ids], "".join(p.text for p in parts), parts[-1].finish_reason,
        None if all(p.logprobs is None for p in parts) else [e for p in parts for e in p.logprobs or ()])
        for index, parts in by_sample.items()]
    last = outs[-1]
    return RequestOutput(last.request_id, samples, last.finished, last.generations)


async def until_done_or_gone(work: asyncio.Future, request: Request) -> None:
    """Returns when `work` is done or the client has closed the connection, whichever comes first."""
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

"""The engine requests of one HTTP request, seen from the event loop: submitted through the worker,
drained as the engine thread hands back their outputs, aborted if the client goes away first."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from forerun.config import SamplingParams, SpecConfig
from forerun.engine.engine import RequestOutput
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
        """(prompt index, output) until every request finished."""
        while self.unfinished:
            item = await self.outputs.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.unfinished.discard(item.request_id)
                self.generations[self.prompt_of[item.request_id]] = item.generations
            yield self.prompt_of[item.request_id], item

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

"""The FastAPI app: OpenAI's completions and chat completions over the engine thread, plus models,
health, metrics, tokenize and detokenize. create_app() needs no socket: tests drive it in-process,
`forerun serve` runs it under uvicorn."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from forerun.config import GenerationDefaults, SpecConfig
from forerun.engine.engine import Engine
from forerun.serve import DEFAULT_MAX_SCALING_JOBS
from forerun.serve import requests as rq
from forerun.serve import responses as rs
from forerun.serve import scaling as sc
from forerun.serve.drafts import DraftModels
from forerun.serve.errors import APIError, error_response, install_error_handlers
from forerun.serve.jobs import Job
from forerun.serve.limits import BodyLimit, CountRequests
from forerun.serve.metrics import Metrics
from forerun.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse,
                                    SamplingFields, TokenizeRequest)
from forerun.serve.worker import EngineWorker
from forerun.structured.tools import ToolStream

log = logging.getLogger("forerun.serve")

MAX_BODY_BYTES = 4 * 2**20
ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "invalid parameters, or a prompt longer than the context"), (401, "a missing or wrong API key"),
    (404, "an unknown model"), (413, "a request body over the limit"),
    (429, "as many scaling requests as the server runs at once are running"), (503, "the model is loading"))}


@dataclass(frozen=True, slots=True)
class ServeConfig:
    model_name: str  # the name clients send as `model`
    spec: SpecConfig = field(default_factory=SpecConfig)  # the default speculation; requests may override it
    api_key: str | None = None  # required as `Authorization: Bearer KEY` on /v1, /tokenize, /detokenize
    max_body_bytes: int = MAX_BODY_BYTES
    max_scaling_jobs: int = DEFAULT_MAX_SCALING_JOBS  # chat requests with `scaling` at once; more get a 429
    draft_models: tuple[str, ...] = ()  # draft models requests may name, besides spec's (forerun.serve.drafts)
    # "auto": unset sampling fields default to the model's; "none" (or "vllm"): not; a folder: its generation_config.json's
    generation_config: str = "auto"

    def __post_init__(self) -> None:
        GenerationDefaults.chosen(self.generation_config, GenerationDefaults())  # a bad folder fails here

    def allowed_draft_models(self) -> tuple[str, ...]:
        return self.draft_models + ((self.spec.draft_model,) if self.spec.draft_model else ())


def create_app(load: Callable[[], Engine], config: ServeConfig,
               on_failure: Callable[[str], None] | None = None) -> FastAPI:
    """An app whose engine thread starts with the app's lifespan and calls load() first; until it
    returns, every model endpoint and /health answer 503. on_failure(reason) is called if the engine
    can no longer serve (load() raised, or the engine thread failed)."""
    metrics = Metrics(config.model_name)
    drafts = DraftModels(config.allowed_draft_models())

    def load_for_serving() -> Engine:
        engine = load()
        drafts.load(engine)
        drafts.add_drafter(engine, config.spec)
        engine.drafter(config.spec)  # a bad default option fails now, not at the first request
        try:  # the vocabulary is read now, not in the first constrained request's step
            _ = engine.grammars
        except ValueError as e:  # such requests are a 400 with this reason
            log.warning("structured outputs are not available: %s", e)
        return engine

    worker = EngineWorker(load_for_serving, metrics, drafts, config.spec, on_failure)
    metrics.watch_engine(lambda: worker.snapshot)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)  # uvicorn has let the requests in flight finish first

    app = FastAPI(title="forerun", summary="OpenAI-compatible server with exact speculative decoding",
                  version="0.1.0", lifespan=lifespan)
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)  # the outermost: it also counts the 413s
    api = _Api(worker, metrics, config, drafts)
    auth = [Depends(_api_key_check(config.api_key))]

    app.get("/health", summary="200 once the model is loaded, 503 before")(api.health)
    app.get("/metrics", summary="Prometheus metrics")(api.metrics_text)
    app.get("/v1/models", dependencies=auth, responses=ERRORS)(api.models)
    app.post("/v1/completions", dependencies=auth, responses=ERRORS,
             summary="OpenAI completions (SSE when stream is true)")(api.completions)
    app.post("/v1/chat/completions", dependencies=auth, responses=ERRORS,
             summary="OpenAI chat completions (SSE when stream is true)")(api.chat_completions)
    app.post("/tokenize", dependencies=auth, responses=ERRORS)(api.tokenize)
    app.post("/detokenize", dependencies=auth, responses=ERRORS)(api.detokenize)
    return app


def _api_key_check(key: str | None):
    bearer = HTTPBearer(auto_error=False)

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # async: no thread
        if key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "missing or incorrect API key (send `Authorization: Bearer KEY`)",
                           code="invalid_api_key")
    return check


class _Api:
    def __init__(self, worker: EngineWorker, metrics: Metrics, config: ServeConfig, drafts: DraftModels):
        self.worker, self.metrics, self.config, self.drafts = worker, metrics, config, drafts
        self.scaling_slots = sc.ScalingSlots(config.max_scaling_jobs, metrics.scaling_running)

    def _served(self, model: str | None = None) -> rq.Served:
        """The served model's facts, once it is ready and `model` names it."""
        self.worker.check_ready()
        rq.check_model(model, self.config.model_name)
        return rq.Served.of(self.worker.engine, self.config.generation_config)

    def _spec(self, body: SamplingFields) -> SpecConfig:
        """The request's speculation, whose draft model (if it names one) the server allows."""
        spec = rq.request_spec(body.speculation, self.config.spec)
        self.drafts.check(spec.draft_model)
        return spec

    async def health(self) -> Response:
        try:
            self.worker.check_ready()
        except APIError as e:
            return error_response(e)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.config.model_name, "object": "model", "created": 0, "owned_by": "forerun",
            "max_model_len": self._served().context}]}

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        served = self._served(body.model)
        tokenizer = served.tokenizer
        prompts = rq.completion_prompts(body.prompt, served)
        logprobs = body.logprobs
        samples = max(body.best_of or 1, body.n)
        structured = rq.structured_output(body)
        params = [] if body.max_tokens == 0 else [
            rq.sampling_params(body, rq.max_new_tokens(body.max_tokens, len(p), samples, served), logprobs, served,
                               structured) for p in prompts]
        scored = await self._prompt_logprobs(prompts, rq.prompt_logprobs_top(body))
        envelope = rs.Envelope("cmpl", "text_completion", self.config.model_name)
        text_of = rs.TokenText(tokenizer)
        echoes = [Echo(tokenizer.decode(p), None if logprobs is None else rs.echo_logprobs(p, lp, text_of, logprobs))
                  if body.echo else Echo() for p, lp in zip(prompts, scored)]
        if body.max_tokens == 0:  # the prompts back, scored: nothing to decode
            choices = [{"index": i, "text": echoes[i // body.n].text, "logprobs": echoes[i // body.n].logprobs,
                        "finish_reason": "length"} for i in range(len(prompts) * body.n)]
            prompt_tokens = sum(map(len, prompts))
            if body.stream:
                return _sse(None, _echo_chunks(choices, body, envelope, prompt_tokens))
            return JSONResponse(envelope(self._with_prompt_logprobs(choices, body, scored, body.n, text_of),
                                         usage=rs.token_usage(prompt_tokens, 0)))
        job = Job(self.worker, prompts, params, self._spec(body))
        await job.start(stream_text=body.stream)
        if body.stream:
            return _sse(job, _completion_chunks(job, body, envelope, echoes, text_of))
        generations = await job.finish(request)
        choices = []
        for i, g in enumerate(generations):
            echo = echoes[i // job.n]
            choice_logprobs = None
            if logprobs is not None:
                choice_logprobs = rs.completion_logprobs(g.logprobs, text_of, len(echo.text))
                if echo.logprobs is not None:
                    choice_logprobs = rs.joined_logprobs(echo.logprobs, choice_logprobs)
            choices.append({"index": i, "text": echo.text + g.text, "logprobs": choice_logprobs,
                            "finish_reason": rs.finish_reason(g.finish_reason)})
        return JSONResponse(envelope(self._with_prompt_logprobs(choices, body, scored, job.n, text_of),
                                     usage=rs.usage(job.prompt_tokens, generations, job.n),
                                     forerun=rs.forerun_stats(job.spec, generations)))

    async def _prompt_logprobs(self, prompts: list[list[int]], top: int | None) -> list[list | None]:
        """Each prompt's engine.prompt_logprobs (computed on the engine thread, its blocks left in the
        prefix cache for the generation that follows), or Nones when the request wants none."""
        if top is None:
            return [None] * len(prompts)
        return [await self.worker.call(lambda engine, p=p: engine.prompt_logprobs(p, top)) for p in prompts]

    @staticmethod
    def _with_prompt_logprobs(choices: list[dict], body, scored: list, n: int, text_of: rs.TokenText) -> list[dict]:
        """vLLM's prompt_logprobs on each choice, when asked for: formatted once per prompt, shared by
        its n choices."""
        if body.prompt_logprobs is not None:
            formatted = [rs.prompt_logprobs(entries, text_of, body.prompt_logprobs) for entries in scored]
            for choice in choices:
                choice["prompt_logprobs"] = formatted[choice["index"] // n]
        return choices

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        served = self._served(body.model)
        tools = rq.tool_use(body, served.tokenizer)
        prompt = rq.chat_prompt(body.messages, served.tokenizer, body, tools)
        structured = rq.structured_output(body, tools)
        if body.scaling is not None:
            if structured is not None or tools is not None:
                raise APIError(400, "scaling takes no structured output or tools", param="scaling")
            return await self._scaled_chat(body, request, served, prompt)
        logprobs = rq.chat_logprobs(body)
        params = rq.sampling_params(body, rq.max_new_tokens(body.completion_limit, len(prompt), body.n, served),
                                    logprobs, served, structured)
        scored = (await self._prompt_logprobs([prompt], body.prompt_logprobs))[0]
        job = Job(self.worker, [prompt], [params], self._spec(body))
        await job.start(stream_text=body.stream)
        envelope = rs.Envelope("chatcmpl", "chat.completion", self.config.model_name)
        text_of = rs.TokenText(served.tokenizer)
        if body.stream:
            envelope.object = "chat.completion.chunk"
            live = tools is not None and structured == tools.grammar()  # every tag opened holds valid calls
            return _sse(job, _chat_chunks(job, body, envelope, text_of, tools, live))
        generations = await job.finish(request)
        choices = [{"index": i, **rs.chat_reply(g.text, g.finish_reason, tools and tools.names),
                    "logprobs": None if logprobs is None else rs.chat_logprobs(g.logprobs, text_of)}
                   for i, g in enumerate(generations)]
        extra = {} if scored is None else {"prompt_logprobs": rs.prompt_logprobs(scored, text_of,
                                                                                 body.prompt_logprobs)}
        return JSONResponse(envelope(choices, usage=rs.usage(job.prompt_tokens, generations, job.n), **extra,
                                     forerun=rs.forerun_stats(job.spec, generations)))

    async def _scaled_chat(self, body: ChatCompletionRequest, request: Request, served: rq.Served,
                           prompt: list[int]) -> Response:
        """One choice: the candidate the strategy chose; usage counts every token it generated."""
        plan = sc.plan(body, served)
        params = rq.sampling_params(body, rq.max_new_tokens(body.completion_limit, len(prompt), plan.n, served),
                                    None, served)
        spec = self._spec(body)
        with self.scaling_slots.claim() as threads:
            answer = await sc.answer(self.worker, request, plan, sc.question_of(body.messages), prompt, params, spec,
                                     served.tokenizer, threads)
        outcome = answer.outcome
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": None,
                  "finish_reason": rs.finish_reason(answer.finish_reason)}
        envelope = rs.Envelope("chatcmpl", "chat.completion", self.config.model_name)
        return JSONResponse(envelope([choice], usage=rs.token_usage(len(prompt), outcome.account.generated_tokens),
                                     forerun=rs.scaling_stats(spec, body.scaling.strategy, plan.n, outcome)))

    async def tokenize(self, body: TokenizeRequest) -> dict:
        served = self._served(body.model)
        if body.messages is not None:
            ids = rq.chat_prompt(body.messages, served.tokenizer, body)
        else:
            ids = served.tokenizer.encode(body.prompt, add_bos=None if body.add_special_tokens else False)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.context}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        served = self._served(body.model)
        rq.check_token_ids(body.tokens, served.vocab_size, "tokens")
        return {"prompt": served.tokenizer.decode(body.tokens)}


# -- streaming ----------------------------------------------------------------------------------------

def _sse(job: Job | None, chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: `data: {chunk}` lines, an error chunk if the request fails midway, and
    `data: [DONE]` at the end in every case. A client that disconnects cancels the generator, whose
    `finally` aborts what has not finished."""
    async def events():
        try:
            try:
                async for chunk in chunks:
                    yield _data(chunk)
            except APIError as e:
                yield _data(e.body())
            except Exception as e:  # noqa: BLE001  (the stream has started: report in-band, never crash)
                log.exception("stream failed")
                yield _data(APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error").body())
            yield "data: [DONE]\n\n"
        finally:
            if job is not None:
                job.abort()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(chunk: dict) -> str:
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


def _usage_extra(body) -> dict:
    """OpenAI sends `usage: null` in every chunk but the last when usage was asked for."""
    return {"usage": None} if body.include_usage else {}


def _usage_chunk(envelope: rs.Envelope, job: Job) -> dict:
    generations = job.choices()
    return envelope([], usage=rs.usage(job.prompt_tokens, generations, job.n),
                    forerun=rs.forerun_stats(job.spec, generations))


@dataclass(frozen=True, slots=True)
class Echo:
    """A completion's echoed prompt: its text, and its tokens' logprobs when asked for."""

    text: str = ""
    logprobs: dict | None = None


async def _echo_chunks(choices: list[dict], body: CompletionRequest, envelope: rs.Envelope,
                       prompt_tokens: int) -> AsyncIterator[dict]:
    """A streamed max_tokens 0 completion: each choice's echo as its one and last chunk."""
    extra = _usage_extra(body)
    for choice in choices:
        yield envelope([choice], **extra)
    if body.include_usage:
        yield envelope([], usage=rs.token_usage(prompt_tokens, 0))


async def _completion_chunks(job: Job, body: CompletionRequest, envelope: rs.Envelope, echoes: list[Echo],
                             text_of: rs.TokenText) -> AsyncIterator[dict]:
    extra = _usage_extra(body)
    offsets = {}  # choice -> characters streamed so far (logprobs' text_offset)
    for i in range(len(job.prompts) * job.n):
        echo = echoes[i // job.n]
        offsets[i] = len(echo.text)
        if echo.text:
            yield envelope([{"index": i, "text": echo.text, "logprobs": echo.logprobs, "finish_reason": None}],
                           **extra)
    async for p, out in job.events():
        for s in out.samples:
            i = p * job.n + s.index
            entries = s.logprobs
            if not (s.text or s.finish_reason or entries):
                continue
            logprobs = None if body.logprobs is None else rs.completion_logprobs(entries or [], text_of, offsets[i])
            offsets[i] += len(s.text)
            yield envelope([{"index": i, "text": s.text, "logprobs": logprobs,
                             "finish_reason": rs.finish_reason(s.finish_reason)}], **extra)
    if body.include_usage:
        yield _usage_chunk(envelope, job)


async def _chat_chunks(job: Job, body: ChatCompletionRequest, envelope: rs.Envelope,
                       text_of: rs.TokenText, tools: rq.ToolUse | None, live: bool) -> AsyncIterator[dict]:
    """Each choice's text as content deltas; with tools, text that may open a call is held back. Calls
    stream as `tool_calls` deltas: `live` (the tools' grammar is the request's constraint, so a tag that
    opens holds valid calls) while the model writes them, otherwise once the choice has ended and its
    text was parsed. A choice that called tools ends with finish_reason "tool_calls"."""
    extra = _usage_extra(body)
    streams = [ToolStream(tools.names, live) if tools is not None else None for _ in range(job.n)]
    for i in range(job.n):
        yield envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}], **extra)
    async for _, out in job.events():
        for s in out.samples:
            entries = s.logprobs
            if not (s.text or s.finish_reason or entries):
                continue
            stream = streams[s.index]
            text = s.text if stream is None else stream.feed(s.text)
            logprobs = rs.chat_logprobs(entries or [], text_of) if body.logprobs else None
            if stream is None:
                yield envelope([{"index": s.index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                                 "finish_reason": rs.finish_reason(s.finish_reason)}], **extra)
                continue
            if not s.finish_reason:
                deltas = ([{"content": text}] if text else []) + stream.call_deltas()
                for k, delta in enumerate(deltas or [{}]):
                    yield envelope([{"index": s.index, "delta": delta, "logprobs": logprobs if k == 0 else None,
                                     "finish_reason": None}], **extra)
                continue
            rest, calls = stream.finish()
            deltas = ([{"content": text}] if text else []) + stream.call_deltas() + \
                ([{"content": rest}] if rest else []) or [{}]
            for delta in deltas[:-1]:
                yield envelope([{"index": s.index, "delta": delta, "logprobs": None, "finish_reason": None}], **extra)
            reason = "tool_calls" if calls else rs.finish_reason(s.finish_reason)
            yield envelope([{"index": s.index, "delta": deltas[-1], "logprobs": logprobs, "finish_reason": reason}],
                           **extra)
    if body.include_usage:
        yield _usage_chunk(envelope, job)

"""The engine: requests in, tokens out, every running sequence in one forward a step.

    engine = Engine(runtime)
    rid = engine.add_request(prompt_ids, SamplingParams(n=4), SpecConfig(method="pld"))
    while engine.has_unfinished():
        for out in engine.step():      # each request's new tokens (and text) this step
            ...
    engine.abort(rid)                  # stops decoding it and frees its KV at once

A step reads as the algorithm: schedule -> propose -> forward -> verify -> commit -> observe. Plain
autoregressive decoding is the same step with the `ar` drafter, whose draft is the root alone. The
speculation stage (speculation.py) drafts and verifies for the whole batch; output.py turns what a
step commits into each request's outputs; this module keeps the requests, the step and the commit.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from forerun.config import EngineConfig, SamplingParams, SpecConfig
from forerun.drafters.base import Drafter
from forerun.engine.batch import pack, scored_rows
from forerun.engine.draft_length import SpeedGuard
from forerun.engine.goodput import Goodput
from forerun.engine.kv_pool import KVPool, PoolBusy
from forerun.engine.output import Outputs, RequestOutput, token_logprobs
from forerun.engine.scheduler import Scheduler, Work
from forerun.engine.sequence import Scoring, Sequence, Status
from forerun.engine.speculation import Speculation
from forerun.logits_process import Context, Processors
from forerun.logits_process import build as build_processors
from forerun.models.batch import ForwardOutput
from forerun.stream import TextStream
from forerun.structured import ConstraintBroken, Grammars
from forerun.types import Draft, Generation, Scores, Stats, TokenLogprob, Verdict

log = logging.getLogger("forerun.engine")

FREE_MEMORY_SHARE = 0.25  # of free memory the KV pool takes at most by default
WORKING_CONTEXT = 2048  # tokens (prompt and output) the default pool holds for each of max_num_seqs sequences


class RequestsFailed(RuntimeError):
    """Raised by Engine.step() after a step in which some requests failed on their own (their
    constraint broke) and were aborted; the step's other requests went on, and their outputs are
    here, to hand out as step() would have returned them."""

    def __init__(self, failures: dict[str, str], outputs: list[RequestOutput]):
        super().__init__("; ".join(f"request {r}: {m}" for r, m in failures.items()))
        self.failures, self.outputs = failures, outputs


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    spec: SpecConfig
    stream_text: bool
    arrival: float
    samples: list[Sequence] = field(default_factory=list)
    forked: bool = False
    done: dict[int, Generation] = field(default_factory=dict)


class Engine:
    def __init__(self, runtime, config: EngineConfig | None = None):
        self.runtime = runtime
        self.model = runtime.model
        self.config = config or EngineConfig()
        self.context_length = model_len(runtime.context_length, self.config.max_model_len)
        slots = self.config.kv_cache_tokens or default_kv_tokens(self.model, self.context_length,
                                                                 self.config.max_num_seqs)
        self.pool = KVPool(self.model.new_cache(slots), self.config.block_size, self.config.prefix_caching)
        log.info("%s%s", pool_size(self.pool), "" if self.config.kv_cache_tokens else
                 f" (default: {self.config.max_num_seqs} sequences of up to {WORKING_CONTEXT} tokens, at most "
                 f"{FREE_MEMORY_SHARE:.0%} of free memory; set --kv-cache-tokens to change it)")
        self.scheduler = Scheduler(self.pool, self.config)
        self.speculation = Speculation(runtime, self.pool, self.config, self.context_length)
        self.outputs = Outputs(self.context_length)
        self.requests: dict[str, Request] = {}
        tokenizer = runtime.tokenizer
        self.eos_ids = frozenset(tokenizer.eos_token_ids) if tokenizer is not None else frozenset()
        self._grammars: Grammars | None = None
        self._failed: dict[str, str] = {}  # this step's requests that failed on their own, by id
        self.rng = torch.Generator()  # the random stream of every sequence without a seed
        self.rng.seed()
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self.steps = 0

    # -- requests -------------------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    spec: SpecConfig | None = None, request_id: str | None = None,
                    stream_text: bool = False) -> str:
        """Queue a request; its outputs come from step(). stream_text: also detokenize each step's
        new tokens (SampleOutput.text); otherwise only the finished generations carry text."""
        params, spec = params or SamplingParams(), spec or SpecConfig()
        request_id = request_id if request_id is not None else f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check(prompt_ids, params)
        self.drafter(spec)  # an unknown method or a bad option fails here, not mid-step
        request = Request(request_id, list(prompt_ids), params, spec, stream_text, time.perf_counter())
        request.samples.append(self._sequence(request, 0, list(prompt_ids), self._generator(params, 0)))
        self.requests[request_id] = request
        self.scheduler.add(request.samples[0])
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop decoding a request and give back its KV blocks now. Unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.samples:
            if not seq.finished:
                self._release(seq, "abort")
        self.outputs.drop(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @torch.inference_mode()
    def prefilled(self, prompt_ids: list[int], params: SamplingParams, spec: SpecConfig) -> Sequence:
        """A sequence whose prompt is cached up to its root, with its drafter begun and room set, handed
        to the caller undecoded: for calling a drafter directly (tests, tools). Its prompt is computed
        by the scheduler like any other work, beside the requests in flight (their outputs wait for the
        next step()). Give it back with release()."""
        self._check(prompt_ids, params)
        seq = self._sequence(Request("", list(prompt_ids), params, spec, False, time.perf_counter()), 0,
                             list(prompt_ids), self._generator(params, 0))
        seq.hold = True
        self._run_until(seq, lambda: seq.status is Status.RUNNING and seq.pending == 1)
        self.scheduler.running.remove(seq)  # the caller's now; its blocks stay held
        seq.room = min(self.config.max_draft_rows, self.context_length - len(prompt_ids) + 1)
        if not self.pool.reserve(seq, seq.cached + seq.pending + seq.room):
            self.pool.free_sequence(seq)
            raise PoolBusy("the KV pool has no room for another sequence now")
        self.speculation.begin(seq)
        return seq

    def score(self, prompt_ids: list[int], continuation_ids: list[int]) -> list[float]:
        """log p(continuation_ids[j] | prompt_ids + continuation_ids[:j]) under the model, for every j,
        computed in the engine's steps (continuation_logprobs). The prompt's cached blocks are reused,
        and the blocks this computes stay in the prefix cache for requests (or scores) that share them."""
        return [e.logprob for e in self.continuation_logprobs(prompt_ids, continuation_ids)]

    def prompt_logprobs(self, prompt_ids: list[int], top: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it, with the `top` most likely
        tokens there: None for the first token, which has no context (an echo's logprobs, vLLM's
        prompt_logprobs)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        rest = self.continuation_logprobs(prompt_ids[:1], prompt_ids[1:], top) if len(prompt_ids) > 1 else []
        return [None, *rest]

    @torch.inference_mode()
    def continuation_logprobs(self, prompt_ids: list[int], continuation_ids: list[int],
                              top: int = 0) -> list[TokenLogprob]:
        """score() with each position's `top` most likely tokens. The text is scheduled like any other
        work, beside the requests in flight (their outputs wait for the next step()), in chunks of at
        most SCORE_CHUNK rows, so a long text never holds more than one chunk's logits at once."""
        if not prompt_ids or not continuation_ids:
            raise ValueError("score needs a non-empty prompt and continuation")
        tokens = list(prompt_ids) + list(continuation_ids)
        self._check(tokens[:-1], SamplingParams(max_new_tokens=1))
        if max(continuation_ids) >= self.model.args.vocab_size or min(continuation_ids) < 0:
            raise ValueError(f"token ids must lie in [0, {self.model.args.vocab_size})")
        seq = self._sequence(Request("", tokens, SamplingParams(), SpecConfig(), False, time.perf_counter()), 0,
                             tokens, None)
        seq.scoring = Scoring(start=len(prompt_ids) - 1, top=top)  # the row predicting continuation_ids[0]
        self._run_until(seq, lambda: seq.finished)
        return seq.scoring.entries

    def _run_until(self, seq: Sequence, done) -> None:
        """Schedule seq (a scored or held sequence, of no request) and run steps until done(); PoolBusy
        when a step finds nothing to run while seq still waits (sequences handed out by prefilled()
        hold the blocks it needs)."""
        self.scheduler.add(seq)
        while not done():
            if not self._advance() and seq.status is Status.WAITING:
                self.scheduler.remove(seq)
                raise PoolBusy("the KV pool has no room for this now; retry when requests in flight finish")

    def release(self, seq: Sequence) -> None:
        """Give back a sequence from prefilled()."""
        self._release(seq, "abort")

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's unreferenced blocks (for measurements that must start cold);
        returns how many blocks were dropped."""
        return self.pool.clear_cache()

    def forget(self, spec: SpecConfig) -> bool:
        """Drop what the engine keeps for `spec` across requests (its drafter, speed guard and goodput
        odds), unless a request still uses it (every scheduled sequence belongs to one; a sequence
        from prefilled() is its caller's, to release() first); returns whether it was dropped. A later
        request with the same spec starts it afresh: only speed is lost, never exactness. A server
        that bounds the configurations clients may create evicts the idle ones with this."""
        if any(request.spec == spec for request in self.requests.values()):
            return False
        self.speculation.forget(spec)
        return True

    @property
    def grammars(self) -> Grammars:
        """The model's compiled constraints (SamplingParams.structured), made at the first request
        that has one: reading the vocabulary takes a moment."""
        if self._grammars is None:
            if self.runtime.tokenizer is None:
                raise ValueError("structured output needs the model's tokenizer")
            self._grammars = Grammars(self.runtime.tokenizer, self.model.args.vocab_size)
        return self._grammars

    def use_drafter(self, spec: SpecConfig, drafter: Drafter) -> None:
        """Draft with `drafter` for `spec` instead of the registry's (kept until forget(spec))."""
        self.drafters[spec] = drafter

    def drafter(self, spec: SpecConfig) -> Drafter:
        return self.speculation.drafter(spec)

    @property
    def drafters(self) -> dict[SpecConfig, Drafter]:
        """The drafter of each SpecConfig in use, kept across requests."""
        return self.speculation.drafters

    @property
    def guards(self) -> dict[SpecConfig, SpeedGuard]:
        return self.speculation.guards

    @property
    def goodput(self) -> Goodput:
        return self.speculation.goodput

    @goodput.setter
    def goodput(self, policy: Goodput) -> None:
        """Start afresh from another policy (what the old one measured is dropped)."""
        self.speculation.goodput = policy

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        context = self.context_length
        if len(prompt_ids) >= context:
            limit = "max_model_len" if context < self.runtime.context_length else "the model's context"
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; {limit} holds {context} "
                             "(prompt and output together)")
        if params.samples > self.config.max_num_seqs:
            raise ValueError(f"{params.samples} samples (n, or best_of) exceed the {self.config.max_num_seqs} "
                             "sequences the engine runs at once (max_num_seqs)")
        vocab = self.model.args.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        longest = min(len(prompt_ids) + params.max_new_tokens, context)
        pool = self.pool
        need = pool.blocks_for(len(prompt_ids)) + params.samples * (pool.blocks_for(longest - len(prompt_ids)) + 1)
        if need > pool.num_blocks:
            raise ValueError(f"the request needs up to {need * pool.block_size} KV slots ({params.samples} x "
                             f"{longest} tokens); the pool holds {pool.num_blocks * pool.block_size} "
                             "(raise --kv-cache-tokens)")

    def _sequence(self, request: Request, index: int, tokens: list[int], generator: torch.Generator | None,
                  processors: Processors | None = None) -> Sequence:
        """Sample `index` of request; sample 0 builds its processors, the others are handed forks of them."""
        spec, params = request.spec, request.params
        seq = Sequence(id=next(self._seq_ids), request_id=request.id, index=index, tokens=tokens,
                       prompt_len=len(request.prompt_ids), params=params, spec=spec, generator=generator,
                       eos_ids=self.eos_ids, stop_ids=frozenset(params.stop_token_ids), kv=self.pool.store,
                       block_size=self.pool.block_size, arrival=request.arrival)
        seq.length = self.speculation.draft_length(spec)
        seq.stats.prompt_tokens = len(request.prompt_ids)
        on_text = (lambda text, s=seq: s.text.append(text)) if request.stream_text else None
        seq.stream = TextStream(self.runtime.tokenizer, params.stop, on_text, params.include_stop_str_in_output,
                                params.min_tokens)
        seq.processors = processors if processors is not None or index else build_processors(params, Context(
            tuple(request.prompt_ids), self.model.args.vocab_size, self.eos_ids, self.runtime.tokenizer,
            self.grammars if params.structured is not None else None))
        return seq

    # -- the step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One forward over every scheduled sequence; returns what each request produced."""
        self._failed = {}
        self._advance()
        outputs = self._collect()
        if self._failed:
            raise RequestsFailed(self._failed, outputs)
        return outputs

    def _advance(self) -> bool:
        """One forward over every scheduled sequence, committed; returns whether there was any work."""
        start = time.perf_counter()
        self._fork_ready()
        work = self.scheduler.schedule(self._may_decode)
        if not work:
            return False
        drafts = self.speculation.propose(work)
        batch = pack(work, drafts)
        forward_start = time.perf_counter()
        out = self.model(batch, self.pool.store, keep_layers=self.speculation.layers_wanted(work, drafts))
        forward_s = time.perf_counter() - forward_start
        out, scored = _split_scored(work, drafts, out)
        self.speculation.observe_prefill(work, batch, out)
        verdicts, scores = self.speculation.verify(work, drafts, batch, out)
        self._commit(work, drafts, verdicts, scores, scored, forward_s)
        self.speculation.record(work, drafts, verdicts, batch.rows, time.perf_counter() - start)
        self.steps += 1
        return True

    def _may_decode(self, seq: Sequence) -> bool:
        """A request of several samples verifies nothing before it forks: each sample draws its own.
        A scored or held sequence never decodes."""
        if seq.scoring is not None or seq.hold:
            return False
        return self.requests[seq.request_id].forked or seq.params.samples == 1

    def _fork_ready(self) -> None:
        """Fork every request of n > 1 samples whose prompt is cached up to its root."""
        for request in self.requests.values():
            parent = request.samples[0]
            if request.forked or request.params.samples == 1 or parent.status is not Status.RUNNING or parent.pending > 1:
                continue
            for i in range(1, request.params.samples):
                processors = parent.processors.fork() if parent.processors is not None else None
                child = self._sequence(request, i, list(parent.tokens), self._generator(request.params, i), processors)
                self.pool.fork(parent, child)
                self.speculation.fork(parent, child)  # what the drafter saw of the shared prompt
                child.stats.cached_tokens = len(request.prompt_ids)
                child.status = Status.RUNNING
                request.samples.append(child)
                self.scheduler.running.append(child)
            request.forked = True

    def _commit(self, work: list[Work], drafts: dict[int, Draft], verdicts: dict[int, Verdict],
                scores: dict[int, Scores], scored: dict[int, torch.Tensor], forward_s: float) -> None:
        """Advance every sequence past what this step computed and accepted, and hand out its tokens
        (a scored sequence's log-probabilities)."""
        for i, w in enumerate(work):
            seq = w.seq
            if seq.request_id in self._failed:
                continue
            seq.cached += w.chunk
            seq.stats.prefill_tokens += w.chunk
            if i not in drafts:
                self.pool.register(seq)
                if i in scored:
                    self._score(seq, scored[i])
                continue
            draft, verdict = drafts[i], verdicts[i]
            self.pool.commit(seq, verdict.path)
            new = draft.tree.tokens[verdict.path[1:]].tolist() + [verdict.next_token]
            seq.tokens.extend(new)
            if seq.processors is not None:
                try:
                    seq.processors.commit(new)
                except ConstraintBroken as e:  # this request cannot go on; the others can
                    self._failed[seq.request_id] = str(e).splitlines()[0]
                    self.abort(seq.request_id)
                    continue
            self.pool.trim(seq, seq.cached)
            self.pool.register(seq)
            self.speculation.observe(seq, draft, verdict, scores[i])
            _count(seq.stats, draft, len(new), forward_s)
            grammar = seq.processors.grammar if seq.processors is not None else None
            finished = self.outputs.emit(seq, new, scores[i].logits[verdict.path],
                                         complete=grammar is not None and grammar.finished)
            if finished is not None:
                self.requests[seq.request_id].done[seq.index] = finished
                self._release(seq, finished.finish_reason)

    def _score(self, seq: Sequence, logits: torch.Tensor) -> None:
        """The log-probabilities of the tokens after a scored sequence's rows just computed (logits:
        those rows', the last ones of its chunk); at its root it is done."""
        scoring, first = seq.scoring, seq.cached - logits.shape[0]
        scoring.entries += token_logprobs(logits, seq.tokens[first + 1:seq.cached + 1], scoring.top)
        scoring.start = seq.cached
        if seq.pending == 1:
            self._release(seq, "stop")

    def _release(self, seq: Sequence, reason: str) -> None:
        self.speculation.end(seq)
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _collect(self) -> list[RequestOutput]:
        outputs = []
        for request_id, samples in self.outputs.take().items():
            request = self.requests[request_id]
            finished = len(request.done) == request.params.samples
            generations = _best(request) if finished else ()
            outputs.append(RequestOutput(request_id, samples, finished, generations))
            if finished:
                del self.requests[request_id]
        return outputs

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        """Sample `index`'s random stream: none when greedy; for a seeded request, the seed itself for
        sample 0 and one derived from (seed, index) for the others; without a seed, the engine's
        stream, which the verifier draws from once a step for all such sequences."""
        if params.greedy:
            return None
        if params.seed is None:
            return self.rng
        if index == 0:
            return torch.Generator().manual_seed(params.seed)
        seed = int(np.random.SeedSequence([params.seed, index]).generate_state(1, np.uint64)[0] % 2**63)
        return torch.Generator().manual_seed(seed)


def _split_scored(work: list[Work], drafts: dict[int, Draft], out: ForwardOutput
                  ) -> tuple[ForwardOutput, dict[int, torch.Tensor]]:
    """out.logits holds, in work order, every decoding sequence's draft rows and every scored
    sequence's scored rows: the first kind for the verifier, the second by index in work."""
    rows = [scored_rows(w) for w in work]
    if not any(rows):
        return out, {}
    keep, scored, row = [], {}, 0
    for i, n in enumerate(rows):
        if i in drafts:
            keep.append(torch.arange(row, row + drafts[i].rows))
            row += drafts[i].rows
        elif n:
            scored[i] = out.logits[row:row + n]
            row += n
    verified = out.logits[torch.cat(keep)] if keep else out.logits[:0]
    return ForwardOutput(verified, out.hidden, out.layers), scored


def _best(request: Request) -> tuple[Generation, ...]:
    """A finished request's n generations: every sample in index order, or with best_of the n of highest
    cumulative logprob, best first."""
    done, n = request.done, request.params.n
    if request.params.samples == n:
        return tuple(done[i] for i in range(n))
    return tuple(sorted(done.values(), key=lambda g: -g.cumulative_logprob)[:n])


def _count(stats: Stats, draft: Draft, emitted: int, forward_s: float) -> None:
    """A verification forward in a sample's stats."""
    stats.target_forwards += 1
    if draft.size > 1:
        stats.drafts += 1
        stats.draft_tokens += draft.size - 1
    stats.verify_s += forward_s
    stats.accept_histogram[emitted] += 1


def model_len(context_length: int, max_model_len: int | None) -> int:
    """The tokens a sequence may hold: the model's context, or less (EngineConfig.max_model_len)."""
    if max_model_len is None:
        return context_length
    if max_model_len > context_length:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context of {context_length} tokens "
                         "(its max_position_embeddings)")
    return max_model_len


def default_kv_tokens(model, context_length: int, max_num_seqs: int) -> int:
    """A pool the engine can use: max_num_seqs sequences of WORKING_CONTEXT tokens each (what they
    leave free holds the prefix cache; longer ones wait or are preempted), at most FREE_MEMORY_SHARE
    of the device's free memory, and at least one full context. Sized by what the engine uses rather
    than by the memory there is: the prefix cache keeps every block it ever filled until the pool runs
    out, so a server in use ends up holding its whole pool, and a share of a big machine's memory
    (255k tokens, 5.6 GiB for a 135M model) is far more than one CPU can decode for."""
    a = model.args
    per_token = 2 * a.num_layers * a.num_kv_heads * a.head_dim * model.kv_dtype.itemsize
    if model.device.type == "cuda":
        free = torch.cuda.mem_get_info(model.device)[0]
    else:
        free = _available_memory()
    wanted = max_num_seqs * min(context_length, WORKING_CONTEXT)
    return max(min(wanted, int(FREE_MEMORY_SHARE * free / per_token)), context_length)


def pool_size(pool: KVPool) -> str:
    """The pool's size, as a log line: tokens, blocks and memory."""
    return (f"KV pool: {pool.num_blocks * pool.block_size} tokens in {pool.num_blocks} blocks of {pool.block_size}, "
            f"{pool.store.slots * pool.store.bytes_per_slot / 2**20:.0f} MiB")


def _available_memory() -> int:
    """Bytes of memory available to new allocations (Linux's MemAvailable; 4 GiB where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30

"""The engine: requests in, tokens out, every running sequence in one forward a step.

    engine = Engine(runtime)
    rid = engine.add_request(prompt_ids, SamplingParams(n=4), SpecConfig(method="pld"))
    while engine.has_unfinished():
        for out in engine.step():      # each request's new tokens (and text) this step
            ...
    engine.abort(rid)                  # stops decoding it and frees its KV at once

A step reads as the algorithm: schedule -> propose -> forward -> verify -> commit -> observe. Plain
autoregressive decoding is the same step with the `ar` drafter, whose draft is the root alone.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from forerun.config import EngineConfig, SamplingParams, SpecConfig
from forerun.drafters.base import Drafter, root_only
from forerun.drafters.registry import build_drafter
from forerun.engine.batch import pack
from forerun.engine.draft_length import DraftLength, SpeedGuard
from forerun.engine.goodput import Entry, Goodput
from forerun.engine.kv_pool import KVPool, PoolBusy
from forerun.engine.scheduler import Scheduler, Work
from forerun.engine.sequence import Sequence, Status
from forerun.models.batch import ForwardBatch, ForwardOutput, Segment
from forerun.stream import TextStream
from forerun.types import Draft, Generation, Scores, TokenLogprob, Verdict
from forerun.verify import verify

log = logging.getLogger("forerun.engine")

FREE_MEMORY_SHARE = 0.25  # of free memory the KV pool takes at most by default
WORKING_CONTEXT = 2048  # tokens (prompt and output) the default pool holds for each of max_num_seqs sequences
RATIO_DECAY = 0.8  # per verified draft, of a sequence's accepted and expected draft tokens
SCORE_CHUNK = 512  # rows per forward when scoring a text (each row's logits span the vocabulary)


@dataclass(frozen=True, slots=True)
class SampleOutput:
    """What one sample of a request produced in one step."""

    index: int  # which of the request's n samples
    token_ids: list[int]  # new ids (after EOS, stop strings and the token limit are applied)
    text: str  # new text, when the request streams text (held back while it may start a stop string)
    finish_reason: str | None  # set on the sample's last output: "eos", "stop", "length"
    logprobs: list[TokenLogprob] | None = None  # aligned with token_ids, when the request asks


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    samples: list[SampleOutput]  # the samples that produced something this step
    finished: bool
    generations: tuple[Generation, ...] = ()  # when finished: every sample, in index order


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
        slots = self.config.kv_cache_tokens or default_kv_tokens(self.model, runtime.context_length,
                                                                 self.config.max_num_seqs)
        self.pool = KVPool(self.model.new_cache(slots), self.config.block_size, self.config.prefix_caching)
        log.info("%s%s", pool_size(self.pool), "" if self.config.kv_cache_tokens else
                 f" (default: {self.config.max_num_seqs} sequences of up to {WORKING_CONTEXT} tokens, at most "
                 f"{FREE_MEMORY_SHARE:.0%} of free memory; set --kv-cache-tokens to change it)")
        self.scheduler = Scheduler(self.pool, self.config)
        self.goodput = Goodput()
        self.drafters: dict[SpecConfig, Drafter] = {}  # one per SpecConfig, kept across requests
        self.guards: dict[SpecConfig, SpeedGuard] = {}
        self.requests: dict[str, Request] = {}
        tokenizer = runtime.tokenizer
        self.eos_ids = frozenset(tokenizer.eos_token_ids) if tokenizer is not None else frozenset()
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._outputs: dict[str, list[SampleOutput]] = {}
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
        request.samples.append(self._sequence(request, 0, list(prompt_ids), _generator(params, 0)))
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
        self._outputs.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @torch.inference_mode()
    def prefilled(self, prompt_ids: list[int], params: SamplingParams, spec: SpecConfig) -> Sequence:
        """A sequence whose prompt is cached up to its root, outside the schedule, with its drafter
        begun and room set: for calling a drafter directly (tests, tools). Give it back with release()."""
        self._check(prompt_ids, params)
        request = Request("", list(prompt_ids), params, spec, False, time.perf_counter())
        seq = self._sequence(request, 0, list(prompt_ids), _generator(params, 0))
        self.pool.match_prefix(seq)
        seq.room = min(self.config.max_draft_rows, self.runtime.context_length - len(prompt_ids) + 1)
        if not self.pool.reserve(seq, seq.cached + seq.pending + seq.room):
            self.pool.free_sequence(seq)
            raise PoolBusy("the KV pool has no room for another sequence now")
        work = Work(seq, seq.pending - 1, False)
        if work.chunk:
            self.model(pack([work], {}), self.pool.store)
        seq.cached += work.chunk
        seq.draft_state, seq.begun = self.drafter(spec).begin(seq), True
        return seq

    def score(self, prompt_ids: list[int], continuation_ids: list[int]) -> list[float]:
        """log p(continuation_ids[j] | prompt_ids + continuation_ids[:j]) under the model, for every j:
        forwards outside the schedule. The prompt's cached blocks are reused, and the blocks this
        computes stay in the prefix cache for requests (or scores) that share them."""
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
        """score() with each position's `top` most likely tokens. Runs in chunks of SCORE_CHUNK rows,
        so a long text never holds more than one chunk's logits (vocab-wide rows) at once."""
        if not prompt_ids or not continuation_ids:
            raise ValueError("score needs a non-empty prompt and continuation")
        tokens = list(prompt_ids) + list(continuation_ids)
        self._check(tokens[:-1], SamplingParams(max_new_tokens=1))
        if max(continuation_ids) >= self.model.args.vocab_size or min(continuation_ids) < 0:
            raise ValueError(f"token ids must lie in [0, {self.model.args.vocab_size})")
        request = Request("", list(prompt_ids), SamplingParams(), SpecConfig(), False, time.perf_counter())
        seq = self._sequence(request, 0, list(prompt_ids), None)
        self.pool.match_prefix(seq)  # within the prompt: the rows that predict the continuation run
        seq.tokens = tokens
        try:
            if not self.pool.reserve(seq, len(tokens)):
                raise PoolBusy("the KV pool has no room to score this now; retry when requests in flight finish")
            first_logit = len(prompt_ids) - 1  # the row predicting continuation_ids[0]
            entries = []
            for start in range(seq.cached, len(tokens) - 1, SCORE_CHUNK):  # the last token predicts nothing
                end = min(start + SCORE_CHUNK, len(tokens) - 1)
                rows = Segment(torch.tensor(tokens[start:end]), torch.arange(start, end), seq.slots(0, end),
                               logits_from=min(max(first_logit - start, 0), end - start))
                out = self.model(ForwardBatch.pack([rows]), self.pool.store)
                seq.cached = end
                if end > first_logit:
                    done = max(start, first_logit) - first_logit
                    entries += token_logprobs(out.logits, continuation_ids[done:end - first_logit], top)
            self.pool.register(seq)
            return entries
        finally:
            self.pool.free_sequence(seq)

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
        self.drafters.pop(spec, None)
        self.guards.pop(spec, None)
        self.goodput.forget(spec)
        return True

    def use_drafter(self, spec: SpecConfig, drafter: Drafter) -> None:
        """Draft with `drafter` for `spec` instead of the registry's (kept until forget(spec))."""
        self.drafters[spec] = drafter

    def drafter(self, spec: SpecConfig) -> Drafter:
        if spec not in self.drafters:
            self.drafters[spec] = build_drafter(self.runtime, spec)
        return self.drafters[spec]

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        context = self.runtime.context_length
        if len(prompt_ids) >= context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context holds {context}")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n = {params.n} samples exceed the {self.config.max_num_seqs} sequences the engine "
                             "runs at once (max_num_seqs)")
        vocab = self.model.args.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        longest = min(len(prompt_ids) + params.max_new_tokens, context)
        pool = self.pool
        need = pool.blocks_for(len(prompt_ids)) + params.n * (pool.blocks_for(longest - len(prompt_ids)) + 1)
        if need > pool.num_blocks:
            raise ValueError(f"the request needs up to {need * pool.block_size} KV slots ({params.n} x "
                             f"{longest} tokens); the pool holds {pool.num_blocks * pool.block_size} "
                             "(raise --kv-cache-tokens)")

    def _sequence(self, request: Request, index: int, tokens: list[int],
                  generator: torch.Generator | None) -> Sequence:
        spec, params = request.spec, request.params
        seq = Sequence(id=next(self._seq_ids), request_id=request.id, index=index, tokens=tokens,
                       prompt_len=len(request.prompt_ids), params=params, spec=spec, generator=generator,
                       eos_ids=self.eos_ids, stop_ids=frozenset(params.stop_token_ids), kv=self.pool.store,
                       block_size=self.pool.block_size, arrival=request.arrival)
        guard = self.guards.setdefault(spec, SpeedGuard()) if spec.guard else None
        seq.length = DraftLength(spec, guard)
        seq.stats.prompt_tokens = len(request.prompt_ids)
        on_text = (lambda text, s=seq: s.text.append(text)) if request.stream_text else None
        seq.stream = TextStream(self.runtime.tokenizer, params.stop, on_text, params.include_stop_str_in_output)
        return seq

    # -- the step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One forward over every scheduled sequence; returns what each request produced."""
        start = time.perf_counter()
        self._fork_ready()
        work = self.scheduler.schedule(self._may_decode)
        if not work:
            return self._collect()
        drafts = self._propose(work)
        batch = pack(work, drafts)
        layers = {k for i in drafts for k in self.drafter(work[i].seq.spec).layers_wanted(work[i].seq)}
        layers |= {k for w in work if w.chunk for k in self.drafter(w.seq.spec).prefill_layers}
        forward_start = time.perf_counter()
        out = self.model(batch, self.pool.store, keep_layers=tuple(sorted(layers)))
        forward_s = time.perf_counter() - forward_start
        self._observe_prefill(work, batch, out)
        verdicts, scores = self._verify(work, drafts, batch, out)
        seconds = self._commit(work, drafts, verdicts, scores, forward_s, start, batch.rows)
        if not any(w.chunk for w in work):  # a prompt chunk's rows cost unlike decoding rows
            self.goodput.record(batch.rows, seconds)
        self.steps += 1
        return self._collect()

    def _may_decode(self, seq: Sequence) -> bool:
        """A request of several samples verifies nothing before it forks: each sample draws its own."""
        return self.requests[seq.request_id].forked or seq.params.n == 1

    def _fork_ready(self) -> None:
        """Fork every request of n > 1 samples whose prompt is cached up to its root."""
        for request in self.requests.values():
            parent = request.samples[0]
            if request.forked or request.params.n == 1 or parent.status is not Status.RUNNING or parent.pending > 1:
                continue
            for i in range(1, request.params.n):
                child = self._sequence(request, i, list(parent.tokens), _generator(request.params, i))
                self.pool.fork(parent, child)
                if parent.begun:  # what the drafter saw of the shared prompt (a head's prompt rows)
                    child.draft_state = self.drafter(request.spec).fork(parent, child)
                    child.begun = child.draft_state is not None
                child.stats.cached_tokens = len(request.prompt_ids)
                child.status = Status.RUNNING
                request.samples.append(child)
                self.scheduler.running.append(child)
            request.forked = True

    def _propose(self, work: list[Work]) -> dict[int, Draft]:
        """Every decoding sequence's draft, by its index in `work`: depth from its DraftLength (or
        the goodput policy), cut by the goodput policy, and cut to its root if the pool cannot hold
        its rows. A drafter that writes the target's K/V drafts only once the prefix is cached."""
        decoding = [i for i, w in enumerate(work) if w.decode]
        context = self.runtime.context_length
        depth = {}
        for i in decoding:
            seq, w = work[i].seq, work[i]
            seq.room = min(self.config.max_draft_rows, context - seq.cached - w.chunk)
            drafter = self.drafter(seq.spec)
            want = 0 if w.chunk and drafter.writes_target_kv else seq.length.value
            if want and drafter.plans_length:
                want = seq.spec.max_draft
            depth[i] = max(min(want, seq.room - 1), 0)
        checked = self._checks(work, decoding, depth)
        self._plan_depths(work, decoding, depth, checked)
        drafts = {}
        for i in decoding:
            seq = work[i].seq
            drafter = self.drafter(seq.spec)
            self._begin(seq)
            t0 = time.perf_counter()
            d = depth[i]
            if d and drafter.writes_target_kv and not self.pool.reserve(seq, seq.cached + d + 1):
                d = 0
            drafts[i] = drafter.propose(seq, d) if d else root_only(seq)
            seq.stats.draft_s += time.perf_counter() - t0
        self._cut(work, drafts, checked)
        for i, draft in drafts.items():
            w = work[i]
            if draft.rows > 1 and not self.pool.reserve(w.seq, w.seq.cached + w.chunk + draft.rows):
                drafts[i] = root_only(w.seq)
        return drafts

    def _checks(self, work: list[Work], decoding: list[int], depth: dict[int, int]) -> set[int]:
        """The sequences whose drafts the goodput policy checks whole this step: the first drafting
        sequence of each SpecConfig whose check is due."""
        first: dict[SpecConfig, int] = {}
        for i in decoding:
            if work[i].seq.spec.goodput and depth[i]:
                first.setdefault(work[i].seq.spec, i)
        return {first[spec] for spec in self.goodput.due_checks(first)}

    def _plan_depths(self, work: list[Work], decoding: list[int], depth: dict[int, int], checked: set[int]) -> None:
        """Before drafting, the goodput policy sets the depth of drafters that pay a forward per drafted
        token, and spares the others drafting where not even one node would pay."""
        planned = [i for i in decoding if work[i].seq.spec.goodput and depth[i]]
        if not planned:
            return
        sure_rows = sum(w.chunk + w.decode for w in work)
        chains = [(work[i].seq.spec, work[i].seq.accepted_ratio, depth[i], i in checked, work[i].seq.last_draft,
                   self.drafter(work[i].seq.spec).keyed) for i in planned]
        for i, d in zip(planned, self.goodput.depths(chains, sure_rows, float(len(decoding)))):
            if d == 0 or self.drafter(work[i].seq.spec).drafts_with_model:
                depth[i] = d

    def _cut(self, work: list[Work], drafts: dict[int, Draft], checked: set[int]) -> None:
        """The goodput policy's cut of every draft of a goodput SpecConfig, across the batch."""
        policed = [i for i in drafts if work[i].seq.spec.goodput]
        if not policed:
            return
        sure_rows = sum(w.chunk for w in work) + len(policed)
        sure_rows += sum(d.rows for i, d in drafts.items() if i not in policed)
        entries = []
        for i in policed:
            seq, draft = work[i].seq, drafts[i]
            entries.append(Entry(draft, self.goodput.memory(seq.spec), seq.accepted_ratio,
                                 cuttable=seq.params.greedy or draft.q is None, checked=i in checked,
                                 context=(draft.key, seq.last_draft)))
        for i, cut in zip(policed, self.goodput.cut(entries, sure_rows, float(len(drafts)))):
            drafts[i] = cut

    def _begin(self, seq: Sequence) -> None:
        """The drafter's per-request state for seq, made once: at its first draft, or earlier when its
        drafter reads its prompt rows."""
        if not seq.begun:
            seq.draft_state, seq.begun = self.drafter(seq.spec).begin(seq), True

    def _observe_prefill(self, work: list[Work], batch, out: ForwardOutput) -> None:
        """Hand each drafter that asks for them (Drafter.prefill_layers) the residual streams at the
        prompt (or recomputed) rows its sequences computed this step; a drafter sees them before its
        sequence's first draft, so it is begun here if it has not been."""
        for i, w in enumerate(work):
            drafter = self.drafter(w.seq.spec)
            if not w.chunk or not drafter.prefill_layers:
                continue
            seq = w.seq
            self._begin(seq)
            first = int(batch.row_start[i])
            rows = slice(first, first + w.chunk)
            drafter.observe_prefill(seq, seq.cached, {k: out.layers[k][rows] for k in drafter.prefill_layers})

    def _verify(self, work: list[Work], drafts: dict[int, Draft], batch, out: ForwardOutput
                ) -> tuple[dict[int, Verdict], dict[int, Scores]]:
        verdicts, scores = {}, {}
        best = out.logits.argmax(dim=-1).tolist()  # one call for every greedy sequence's rows
        row = 0  # into out.logits, which holds the decoding sequences' draft rows in order
        for i, w in enumerate(work):
            if i not in drafts:
                continue
            draft, seq = drafts[i], w.seq
            first = int(batch.row_start[i]) + w.chunk
            rows = slice(first, first + draft.rows)
            logits = out.logits[row:row + draft.rows]
            scores[i] = Scores(logits=logits, hidden=out.hidden[rows],
                               layers={k: v[rows] for k, v in out.layers.items()})
            verdicts[i] = verify(draft, logits[:draft.size], seq.params, seq.generator, best[row:row + draft.size])
            row += draft.rows
        return verdicts, scores

    def _commit(self, work: list[Work], drafts: dict[int, Draft], verdicts: dict[int, Verdict],
                scores: dict[int, Scores], forward_s: float, start: float, total_rows: int) -> float:
        """Advance every sequence past what this step computed and accepted; returns the step's seconds."""
        finished_steps = []
        for i, w in enumerate(work):
            seq = w.seq
            seq.cached += w.chunk
            seq.stats.prefill_tokens += w.chunk
            if i not in drafts:
                self.pool.register(seq)
                continue
            draft, verdict = drafts[i], verdicts[i]
            self.pool.commit(seq, verdict.path)
            new = draft.tree.tokens[verdict.path[1:]].tolist() + [verdict.next_token]
            seq.tokens.extend(new)
            logprobs = None if seq.params.logprobs is None else token_logprobs(
                scores[i].logits[verdict.path], new, seq.params.logprobs)
            self.pool.trim(seq, seq.cached)
            self.pool.register(seq)
            self.drafter(seq.spec).observe(seq, draft, verdict, scores[i])
            if seq.spec.goodput and draft.size > 1:
                expected = self.goodput.learn(seq.spec, draft, verdict, (draft.key, seq.last_draft))
                # recent drafts weigh most: acceptance comes in runs (a copied passage, a list)
                seq.draft_expected = RATIO_DECAY * seq.draft_expected + expected
                seq.draft_accepted = RATIO_DECAY * seq.draft_accepted + verdict.accepted
            seq.last_draft = _outcome(draft, verdict)
            seq.stats.target_forwards += 1
            if draft.size > 1:
                seq.stats.drafts += 1
                seq.stats.draft_tokens += draft.size - 1
            seq.stats.verify_s += forward_s
            seq.stats.accept_histogram[len(new)] += 1
            finished_steps.append((seq, draft, verdict, len(new), w.chunk))
            self._emit(seq, new, logprobs)
        seconds = time.perf_counter() - start
        for seq, draft, verdict, emitted, chunk in finished_steps:
            share = None if chunk else seconds * draft.rows / total_rows  # a prefill's time is not drafting's
            seq.length.update(max(draft.tree.depths), verdict.accepted, share, emitted)
        return seconds

    # -- outputs --------------------------------------------------------------------------------------

    def _emit(self, seq: Sequence, new: list[int], logprobs: list[TokenLogprob] | None) -> None:
        """Apply the token limit, EOS and stop strings to a step's new tokens; finish seq if done."""
        params = seq.params
        new = new[: params.max_new_tokens - len(seq.output)]
        reason = None
        ends = seq.eos_ids if not params.ignore_eos else frozenset()
        end_at = next((j for j, t in enumerate(new) if t in ends or t in seq.stop_ids), None)
        if end_at is not None:
            reason = "eos" if new[end_at] in ends else "stop"
            new = new[:end_at]
        if not seq.output and new:
            seq.stats.ttft_s = time.perf_counter() - seq.arrival
        seq.output.extend(new)
        if seq.stream(new):
            reason = "stop"
        elif reason is None and (len(seq.output) >= params.max_new_tokens
                                 or len(seq.tokens) >= self.runtime.context_length):
            reason = "length"
        if reason == "stop" and seq.stream.stopped:  # the ids up to the stop string's start
            before = len(seq.output) - len(new)
            new = new[: max(seq.stream.cut_ids - before, 0)]
            seq.output = seq.output[: seq.stream.cut_ids]
        if logprobs is not None:
            logprobs = logprobs[: len(new)]
            seq.logprobs.extend(logprobs)
            del seq.logprobs[len(seq.output):]
        final = seq.stream.final_text(seq.output) if reason is not None else None  # flushes held-back text
        text = "".join(seq.text)
        seq.text.clear()
        if new or text or reason:
            self._outputs.setdefault(seq.request_id, []).append(SampleOutput(seq.index, new, text, reason, logprobs))
        if reason is not None:
            self._finish(seq, reason, final)

    def _finish(self, seq: Sequence, reason: str, text: str) -> None:
        seq.stats.new_tokens = len(seq.output)
        seq.stats.wall_s = time.perf_counter() - seq.arrival
        generation = Generation(text=text, token_ids=list(seq.output), finish_reason=reason, stats=seq.stats,
                                logprobs=None if seq.params.logprobs is None else list(seq.logprobs))
        self.requests[seq.request_id].done[seq.index] = generation
        self._release(seq, reason)

    def _release(self, seq: Sequence, reason: str) -> None:
        if seq.begun:
            self.drafter(seq.spec).end(seq)
        seq.draft_state = None
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _collect(self) -> list[RequestOutput]:
        outputs = []
        for request_id, samples in self._outputs.items():
            request = self.requests[request_id]
            finished = len(request.done) == request.params.n
            generations = tuple(request.done[i] for i in range(request.params.n)) if finished else ()
            outputs.append(RequestOutput(request_id, samples, finished, generations))
            if finished:
                del self.requests[request_id]
        self._outputs = {}
        return outputs


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each token's log-probability under the logits row before it (row j predicts tokens[j]), its
    rank there, and the `top` most likely tokens of that row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])
    ranks = ((logp > chosen).sum(dim=1) + 1).tolist()
    chosen = chosen[:, 0].tolist()
    if top == 0:
        return [TokenLogprob(t, lp, (), r) for t, lp, r in zip(tokens, chosen, ranks)]
    values, ids = logp.topk(top, dim=-1)
    return [TokenLogprob(t, lp, tuple(zip(i, v)), r)
            for t, lp, i, v, r in zip(tokens, chosen, ids.tolist(), values.tolist(), ranks)]


def _outcome(draft: Draft, verdict: Verdict) -> str:
    """How a step's draft went, for the next step's odds: "plain" (no draft), "all" (its deepest
    path accepted), "some" or "none"."""
    if draft.size == 1:
        return "plain"
    if verdict.accepted == 0:
        return "none"
    return "all" if verdict.accepted == max(draft.tree.depths) else "some"


def _generator(params: SamplingParams, index: int) -> torch.Generator | None:
    """Sample `index`'s random stream: the seed itself for sample 0, one derived from (seed, index)
    for the others, a fresh random seed without one."""
    if params.greedy:
        return None
    if params.seed is None:
        seed = int(torch.seed() % 2**63)
    elif index == 0:
        seed = params.seed
    else:
        seed = int(np.random.SeedSequence([params.seed, index]).generate_state(1, np.uint64)[0] % 2**63)
    return torch.Generator().manual_seed(seed)


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

"""What a step hands back: each sequence's committed tokens with the token limit, EOS, stop ids and
stop strings applied, its streamed text, and the logprobs its request asks for."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from forerun.engine.sequence import Sequence
from forerun.types import Generation, TokenLogprob


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


class Outputs:
    """The samples' outputs of the current step, by request, until the engine collects them."""

    def __init__(self, context_length: int):
        self.context_length = context_length
        self.pending: dict[str, list[SampleOutput]] = {}

    def emit(self, seq: Sequence, new: list[int], logits: torch.Tensor, complete: bool = False) -> Generation | None:
        """Hand out a step's new tokens of seq (already appended to seq.tokens) after the token limit,
        EOS, stop ids and stop strings; logits: [len(new), V], the rows that predicted them; complete:
        its structured output admits nothing more, which ends it ("stop"). Returns the sample's
        Generation when this ends it."""
        params = seq.params
        logprobs = None if params.logprobs is None else token_logprobs(logits, new, params.logprobs)
        complete = complete and len(new) <= params.max_new_tokens - len(seq.output)  # not if the limit cut it
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
        elif reason is None and complete:
            reason = "stop"
        elif reason is None and (len(seq.output) >= params.max_new_tokens or len(seq.tokens) >= self.context_length):
            reason = "length"
        if reason == "stop" and seq.stream.stopped:  # the ids up to the stop string's start
            before = len(seq.output) - len(new)
            new = new[: max(seq.stream.cut_ids - before, 0)]
            seq.output = seq.output[: seq.stream.cut_ids]
        if params.samples > params.n:  # best_of ranks the samples by it
            seq.cumulative_logprob += chosen_logprob(logits[: len(new)], new)
        if logprobs is not None:
            logprobs = logprobs[: len(new)]
            seq.logprobs.extend(logprobs)
            del seq.logprobs[len(seq.output):]
        final = seq.stream.final_text(seq.output) if reason is not None else None  # flushes held-back text
        text = "".join(seq.text)
        seq.text.clear()
        if new or text or reason:
            self.pending.setdefault(seq.request_id, []).append(SampleOutput(seq.index, new, text, reason, logprobs))
        return None if reason is None else generation(seq, reason, final)

    def take(self) -> dict[str, list[SampleOutput]]:
        """This step's outputs by request, handed over once."""
        pending, self.pending = self.pending, {}
        return pending

    def drop(self, request_id: str) -> None:
        self.pending.pop(request_id, None)


def generation(seq: Sequence, reason: str, text: str) -> Generation:
    """A finished sample, its stats closed."""
    seq.stats.new_tokens = len(seq.output)
    seq.stats.wall_s = time.perf_counter() - seq.arrival
    return Generation(text=text, token_ids=list(seq.output), finish_reason=reason, stats=seq.stats,
                      logprobs=None if seq.params.logprobs is None else list(seq.logprobs),
                      cumulative_logprob=seq.cumulative_logprob)


def chosen_logprob(logits: torch.Tensor, tokens: list[int]) -> float:
    """The summed log-probability of tokens under the logits rows before them (row j predicts tokens[j])."""
    if not tokens:
        return 0.0
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None]).sum())


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

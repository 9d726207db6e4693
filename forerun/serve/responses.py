"""OpenAI response bodies and stream chunks, as plain dicts (the JSON the client parses)."""
from __future__ import annotations

import time
import uuid

from forerun.config import SpecConfig
from forerun.scaling.types import Outcome
from forerun.structured.tools import parse_tool_calls
from forerun.types import Generation

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # the engine's -> OpenAI's
MIN_LOGPROB = -9999.0  # JSON has no -inf; a token the model rules out is reported at this floor


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(engine_reason: str | None) -> str | None:
    return None if engine_reason is None else FINISH_REASONS.get(engine_reason, engine_reason)


def chat_reply(text: str, engine_reason: str, tool_names: set[str] | None) -> dict:
    """A chat choice's message and finish_reason. With tools, the calls in the text become
    `tool_calls` (finish_reason "tool_calls") and the rest, if any, the content."""
    calls = []
    if tool_names:
        content, calls = parse_tool_calls(text, tool_names)
    message = {"role": "assistant", "content": content if calls else text}
    if calls:
        message["tool_calls"] = [c.as_openai() for c in calls]
    return {"message": message, "finish_reason": "tool_calls" if calls else finish_reason(engine_reason)}


class Envelope:
    """The fields every response and chunk of one request shares."""

    def __init__(self, prefix: str, obj: str, model: str):
        self.id, self.object, self.model = new_id(prefix), obj, model
        self.created = int(time.time())

    def __call__(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}


def usage(prompt_tokens: int, generations: list[Generation], n: int) -> dict:
    """Token counts of a request's generations (n samples of each prompt, prompt by prompt). The
    cached prompt tokens are those its prompts found in the prefix cache: counted on each prompt's
    first sample, since the other n - 1 share that sample's prompt (a fork), found or computed."""
    cached = sum(g.stats.cached_tokens for g in generations[::n])
    return token_usage(prompt_tokens, sum(len(g.token_ids) for g in generations), cached)


def token_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def forerun_stats(spec: SpecConfig, generations: list[Generation]) -> dict:
    """forerun's own account of each choice (tau = mean_accepted, target forwards, timings), in an
    extra field that OpenAI clients ignore."""
    return {"method": spec.method, "budget": spec.budget,
            "choices": [{"index": i, "tau": round(g.stats.mean_accepted, 4), **g.stats.to_dict()}
                        for i, g in enumerate(generations)]}


def scaling_stats(spec: SpecConfig, strategy: str, n: int, outcome: Outcome) -> dict:
    """forerun's account of a scaled answer: every candidate the strategy considered (its extracted
    answer, score and tokens), which one it chose, and what answering cost (scaling's Account)."""
    chosen = outcome.chosen
    candidates = [{"answer": c.answer, "score": None if c.score is None else _value(c.score), "tokens": c.tokens,
                   "text": c.text} for c in outcome.candidates]
    return {"method": spec.method, "budget": spec.budget, "scaling": {
        "strategy": strategy, "n": n, "answer": outcome.answer,
        "chosen": outcome.candidates.index(chosen) if chosen in outcome.candidates else None,
        "candidates": candidates, "account": outcome.account.to_dict(), "notes": outcome.notes}}


class TokenText:
    """Token ids -> their text one by one, cached (logprobs name every token and its alternatives)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id], skip_special=False)
        return self.cache[token_id]


def _value(logprob: float) -> float:
    return max(float(logprob), MIN_LOGPROB)


def completion_logprobs(entries, text_of: TokenText, offset: int = 0, top: int | None = None) -> dict:
    """The legacy completions shape: parallel lists, offsets into the choice's text, at most `top`
    alternatives a token. An entry is a TokenLogprob, or a bare token id: an echoed prompt's first
    token, which has no context, so its logprob and alternatives are null (as OpenAI and vLLM send it)."""
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        bare = isinstance(e, int)
        text = text_of(e if bare else e.token_id)
        tokens.append(text)
        values.append(None if bare else _value(e.logprob))
        tops.append(None if bare else {text_of(t): _value(lp) for t, lp in e.top[:top]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(prompt_ids: list[int], entries: list, text_of: TokenText, top: int) -> dict:
    """An echoed prompt's tokens in the legacy shape, from the engine's prompt_logprobs."""
    return completion_logprobs([prompt_ids[0], *entries[1:]], text_of, 0, top)


def joined_logprobs(first: dict, then: dict) -> dict:
    """Two legacy logprobs objects, one after the other (an echo's, then the generated tokens')."""
    return {key: first[key] + then[key] for key in first}


def prompt_logprobs(entries: list, text_of: TokenText, top: int) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt token, None for the first, else {token id: logprob, rank,
    decoded_token} for the token itself and the `top` most likely there."""
    out = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        alternatives = {str(e.token_id): {"logprob": _value(e.logprob), "rank": e.rank,
                                          "decoded_token": text_of(e.token_id)}}
        for rank, (t, lp) in enumerate(e.top[:top], 1):
            alternatives.setdefault(str(t), {"logprob": _value(lp), "rank": rank, "decoded_token": text_of(t)})
        out.append(alternatives)
    return out


def chat_logprobs(entries, text_of: TokenText) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        text = text_of(token_id)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}

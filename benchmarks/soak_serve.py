"""A bounded soak test of `forerun serve`, on loopback only.

It starts its own server (the embedded model, q4, an API key of its own, a free loopback port) or
targets one already running (--url, a loopback address; --pid for its memory). N clients then loop
for D seconds over a mix of requests: chat and completions, streamed and not, n = 2 on some, 15% of
the streams closed after their first chunks, greedy requests from a fixed set of prompts (every
repeat of a prompt, endpoint and length must answer the same text, streamed or not, n = 1 or 2) and
sampled ones. Every answer is checked: its status, its body (JSON, n choices, valid finish reasons;
a stream's every chunk, and [DONE] last), and that it came at all. Meanwhile the server's RSS,
/metrics (KV blocks in use, sequences running and waiting) and /health are sampled.

Then hostile requests, one at a time, each of which must get a 4xx within its timeout; then, once
nothing is in flight: /health must answer 200, the KV pool must hold no block, a greedy repeat must
still answer as before, and the RSS beyond the KV pool's touched pages (/metrics'
forerun:kv_cache_touched_bytes: the prefix cache fills the configured pool over time, and a page is
resident once its block is first used) over the last 5 minutes of the load (its last half if
shorter) must stay within 5%. Writes results.json and report.md into --out; exits 1 if a check failed.

    python benchmarks/soak_serve.py                              # 64 clients, 600 s
    python benchmarks/soak_serve.py --clients 16 --duration 60 --out soak-short
    python benchmarks/soak_serve.py --url http://127.0.0.1:8000 --pid 1234 --api-key KEY
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import platform
import random
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from forerun.bench.serving import free_port, stop_process, wait_healthy

# few, so that even a short run repeats each (prompt, endpoint, length) several times
GREEDY_PROMPTS = (
    "List three uses of a paperclip.",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "Give two tips for sleeping well.",
)
GREEDY_MAX_TOKENS = (16, 48)
TOPICS = ("rivers", "bread", "chess", "volcanoes", "bicycles", "owls", "tea", "glass", "maps", "bees")
FINISH_REASONS = {"stop", "length"}
IN_BAND_STATUS = {"internal_error": 500, "service_unavailable": 503}  # an error chunk's type -> its status
ABORT_SHARE = 0.15  # of streams, closed after their first chunks
RSS_FLAT_TOLERANCE = 0.05
RSS_WINDOW_S = 300.0
EXAMPLES_KEPT = 5  # failures of each kind kept verbatim in the results


# -- the requests of the load ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Plan:
    """One request of the load."""

    endpoint: str  # "chat" or "completions"
    stream: bool
    n: int
    greedy: bool
    prompt: str
    max_tokens: int
    abort_after: int | None = None  # chunks read before closing the connection (streams only)
    usage: bool = False  # stream_options.include_usage

    @property
    def kind(self) -> str:
        return f"{self.endpoint} {'stream' if self.stream else 'plain'}"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    @property
    def greedy_key(self) -> str | None:
        """Greedy answers that must be equal share a key: streaming and n change nothing in the text."""
        if not self.greedy or self.abort_after is not None:
            return None
        return f"{self.endpoint} | max_tokens {self.max_tokens} | {self.prompt}"

    def body(self, rng: random.Random) -> dict:
        body = {"max_tokens": self.max_tokens, "n": self.n, "stream": self.stream}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.greedy:
            body["temperature"] = 0
        else:
            body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
        if self.usage:
            body["stream_options"] = {"include_usage": True}
        return body


def draw_plan(rng: random.Random) -> Plan:
    endpoint = rng.choice(("chat", "completions"))
    stream, greedy = rng.random() < 0.5, rng.random() < 0.5
    n = 2 if rng.random() < 0.2 else 1
    if greedy:
        prompt, max_tokens = rng.choice(GREEDY_PROMPTS), rng.choice(GREEDY_MAX_TOKENS)
    else:  # a fresh prompt, so that sampled requests also prefill, not only hit the prefix cache
        prompt = f"Write a short note about {rng.choice(TOPICS)}, number {rng.randrange(10**6)}."
        max_tokens = rng.randint(16, 48)
    abort_after = rng.randint(1, 3) if stream and rng.random() < ABORT_SHARE else None
    return Plan(endpoint, stream, n, greedy, prompt, max_tokens, abort_after, usage=stream and rng.random() < 0.5)


# -- checking one answer -------------------------------------------------------------------------------

class Malformed(Exception):
    """An answer whose status was fine but whose body breaks the protocol."""


class InBandError(Exception):
    """A stream that reported an error in a chunk; `status` is the error's code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Answer:
    texts: list[str]
    aborted: bool = False


def check_plain(plan: Plan, data) -> Answer:
    """A non-streamed answer's body: n choices, indexed 0..n-1, each with text and a finish reason."""
    choices = _field(data, "choices", list)
    if sorted(_field(c, "index", int) for c in choices) != list(range(plan.n)):
        raise Malformed(f"choice indices {[c.get('index') for c in choices]} for n = {plan.n}")
    texts = [""] * plan.n
    for c in choices:
        _finish_reason(c)
        texts[c["index"]] = _field(_field(c, "message", dict), "content", str) if plan.endpoint == "chat" \
            else _field(c, "text", str)
    usage = _field(data, "usage", dict)
    if not 0 <= _field(usage, "completion_tokens", int) <= plan.n * plan.max_tokens:  # 0: EOS came first
        raise Malformed(f"usage.completion_tokens {usage['completion_tokens']} for n {plan.n} x {plan.max_tokens}")
    return Answer(texts)


async def read_stream(plan: Plan, response: httpx.Response) -> Answer:
    """A stream's events: every chunk JSON, each choice finished once, usage when asked, [DONE] last.
    A deliberate abort returns after `abort_after` chunks; the caller's exit closes the connection."""
    texts, finished, chunks, done, usage_seen = [""] * plan.n, [False] * plan.n, 0, False, False
    async for line in response.aiter_lines():
        if not line:
            continue
        if not line.startswith("data: ") or done:
            raise Malformed(f"unexpected line {line[:80]!r}" + (" after [DONE]" if done else ""))
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            continue
        chunk = _json(payload)
        if "error" in chunk:  # the server met an error after the 200 went out
            error = _field(chunk, "error", dict)
            raise InBandError(IN_BAND_STATUS.get(error.get("type"), 400), str(error)[:300])
        chunks += 1
        usage_seen |= chunk.get("usage") is not None
        for c in _field(chunk, "choices", list):
            _add_delta(plan, c, texts, finished)
        if plan.abort_after is not None and chunks >= plan.abort_after:
            return Answer(texts, aborted=True)
    if not done:
        raise Malformed("the stream ended without [DONE]")
    if not all(finished):
        raise Malformed(f"choices without a finish reason: {[i for i, f in enumerate(finished) if not f]}")
    if plan.usage and not usage_seen:
        raise Malformed("include_usage was asked for, but no chunk carried usage")
    return Answer(texts)


def _add_delta(plan: Plan, choice, texts: list[str], finished: list[bool]) -> None:
    i = _field(choice, "index", int)
    if not 0 <= i < plan.n:
        raise Malformed(f"choice index {i} for n = {plan.n}")
    if finished[i]:
        raise Malformed(f"choice {i} goes on after its finish reason")
    texts[i] += (_field(choice, "delta", dict).get("content") or "") if plan.endpoint == "chat" \
        else _field(choice, "text", str)
    if choice.get("finish_reason") is not None:
        _finish_reason(choice)
        finished[i] = True


def _finish_reason(choice) -> str:
    reason = choice.get("finish_reason")
    if reason not in FINISH_REASONS:
        raise Malformed(f"finish_reason {reason!r}")
    return reason


def _field(data, name: str, kind: type):
    value = data.get(name) if isinstance(data, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Malformed(f"{name} is {value!r}, not {kind.__name__}")
    return value


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise Malformed(f"not JSON ({e}): {text[:80]!r}") from None


# -- the tally of the load ----------------------------------------------------------------------------

@dataclass
class Tally:
    by_kind: Counter = field(default_factory=Counter)
    ok: int = 0
    n2: int = 0
    greedy: int = 0
    aborted: int = 0
    status_5xx: int = 0
    other_status: Counter = field(default_factory=Counter)  # non-200 below 500, by status
    malformed: int = 0
    lost: int = 0
    greedy_answers: dict = field(default_factory=dict)  # key -> {"text", "repeats", "mismatches"}
    examples: dict = field(default_factory=dict)  # failure kind -> a few examples

    def failure(self, kind: str, plan: Plan, detail: str) -> None:
        kept = self.examples.setdefault(kind, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append({"request": plan.kind, "n": plan.n, "greedy": plan.greedy, "detail": detail[:500]})

    def greedy_text(self, key: str, text: str) -> None:
        """The first answer of a key is its reference; every later one must equal it."""
        seen = self.greedy_answers.setdefault(key, {"text": text, "repeats": 0, "mismatched": 0, "mismatches": []})
        seen["repeats"] += 1
        if text != seen["text"]:
            seen["mismatched"] += 1
            if len(seen["mismatches"]) < EXAMPLES_KEPT:
                seen["mismatches"].append(text)

    @property
    def greedy_texts(self) -> int:
        return sum(a["repeats"] for a in self.greedy_answers.values())

    @property
    def mismatched(self) -> int:
        return sum(a["mismatched"] for a in self.greedy_answers.values())

    def summary(self) -> dict:
        return {"total": sum(self.by_kind.values()), "by_kind": dict(self.by_kind), "ok": self.ok, "n2": self.n2,
                "greedy": self.greedy, "aborted": self.aborted, "status_5xx": self.status_5xx,
                "other_status": {str(k): v for k, v in self.other_status.items()}, "malformed": self.malformed,
                "lost": self.lost, "greedy_keys": len(self.greedy_answers), "greedy_mismatched": self.mismatched}


async def send(http: httpx.AsyncClient, plan: Plan, rng: random.Random, tally: Tally) -> None:
    """One request of the load, checked and counted."""
    tally.by_kind[plan.kind] += 1
    tally.n2 += plan.n == 2
    tally.greedy += plan.greedy
    try:
        answer = await _exchange(http, plan, plan.body(rng))
    except _Status as e:
        _count_status(tally, plan, e.status, e.text)
        return
    except InBandError as e:
        _count_status(tally, plan, e.status, f"in-band: {e}")
        return
    except Malformed as e:
        tally.malformed += 1
        tally.failure("malformed", plan, str(e))
        return
    except httpx.TransportError as e:  # no answer: a timeout, a reset, a refused connection
        tally.lost += 1
        tally.failure("lost", plan, f"{type(e).__name__}: {e}")
        return
    if answer.aborted:
        tally.aborted += 1
        return
    tally.ok += 1
    if plan.greedy_key is not None:
        for text in answer.texts:
            tally.greedy_text(plan.greedy_key, text)


class _Status(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(status)
        self.status, self.text = status, text


async def _exchange(http: httpx.AsyncClient, plan: Plan, body: dict) -> Answer:
    if not plan.stream:
        response = await http.post(plan.path, json=body)
        if response.status_code != 200:
            raise _Status(response.status_code, response.text[:300])
        return check_plain(plan, _json(response.text))
    async with http.stream("POST", plan.path, json=body) as response:
        if response.status_code != 200:
            raise _Status(response.status_code, (await response.aread()).decode(errors="replace")[:300])
        return await read_stream(plan, response)


def _count_status(tally: Tally, plan: Plan, status: int, text: str) -> None:
    if status >= 500:
        tally.status_5xx += 1
        tally.failure("5xx", plan, f"{status}: {text}")
    else:
        tally.other_status[status] += 1
        tally.failure("non-200", plan, f"{status}: {text}")


async def client_loop(http: httpx.AsyncClient, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        await send(http, draw_plan(rng), rng, tally)


# -- sampling the server ------------------------------------------------------------------------------

METRICS = {"forerun:kv_cache_used_blocks": "kv_used_blocks", "forerun:kv_cache_total_blocks": "kv_total_blocks",
           "forerun:kv_cache_touched_bytes": "kv_touched_bytes",
           "forerun:num_seqs_running": "running", "forerun:num_seqs_waiting": "waiting"}


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # the process is gone: the sample says so
        return None
    return None


async def sample(http: httpx.AsyncClient, pid: int | None, began: float) -> dict:
    """One sample: seconds since the load began, the server's RSS, /health's status, the engine gauges."""
    point = {"t": round(time.monotonic() - began, 2), "rss": rss_bytes(pid) if pid else None}
    try:
        point["health"] = (await http.get("/health")).status_code
        text = (await http.get("/metrics")).text
    except httpx.TransportError as e:
        point["health"] = f"{type(e).__name__}"
        return point
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in METRICS:
            point[METRICS[name]] = float(value)
    return point


async def sample_until(stop: asyncio.Event, http: httpx.AsyncClient, pid: int | None, began: float, every: float,
                       samples: list[dict], log) -> None:
    last_log = 0.0
    while not stop.is_set():
        point = await sample(http, pid, began)
        samples.append(point)
        if point["t"] - last_log >= 30:
            last_log = point["t"]
            rss = f"{point['rss'] / 2**20:.0f} MiB" if point["rss"] else "?"
            log(f"  t={point['t']:.0f}s RSS {rss}, KV blocks {point.get('kv_used_blocks')}, running "
                f"{point.get('running')}, waiting {point.get('waiting')}, /health {point['health']}")
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


# -- hostile requests ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hostile:
    name: str
    path: str
    body: bytes
    headers: dict | None = None  # None: JSON with the API key


def _raw(obj) -> bytes:
    """JSON bytes; Python's encoder writes a lone surrogate as the escape \\ud800, as a hostile client may."""
    return json.dumps(obj).encode()


def hostile_requests(api_key: str | None, context: int) -> list[Hostile]:
    chat, completions, prompt = "/v1/chat/completions", "/v1/completions", "x " * (context + 64)
    nested = 100_000
    items = [
        Hostile("lone surrogate in prompt", completions, _raw({"prompt": "a\ud800b", "max_tokens": 4})),
        Hostile("lone surrogate in messages", chat,
                _raw({"messages": [{"role": "user", "content": "a\ud800b"}], "max_tokens": 4})),
        Hostile("lone surrogate in tokenize", "/tokenize", _raw({"prompt": "a\ud800b"})),
        Hostile("lone surrogate in stop", completions, _raw({"prompt": "hi", "max_tokens": 4, "stop": ["\ud800"]})),
        Hostile("unknown chat role 'wizard'", chat, _raw({"messages": [{"role": "wizard", "content": "hi"}],
                                                          "max_tokens": 4})),
        Hostile("empty messages", chat, _raw({"messages": [], "max_tokens": 4})),
        Hostile("1000 stop strings", completions,
                _raw({"prompt": "hi", "max_tokens": 4, "stop": [f"stop{i}" for i in range(1000)]})),
        Hostile("stop strings of 100k chars", completions,
                _raw({"prompt": "hi", "max_tokens": 4, "stop": ["s" * 100_000] * 4})),
        Hostile("malformed JSON", completions, b'{"prompt": "hi", "max_tokens": '),
        Hostile("wrong types", completions, _raw({"prompt": {"text": "hi"}, "max_tokens": "ten"})),
        Hostile("messages not a list", chat, _raw({"messages": "hello", "max_tokens": 4})),
        Hostile("negative max_tokens", completions, _raw({"prompt": "hi", "max_tokens": -5})),
        Hostile("max_tokens 10^12", completions, _raw({"prompt": "hi", "max_tokens": 10**12})),
        Hostile("prompt longer than the context", completions, _raw({"prompt": prompt, "max_tokens": 4})),
        Hostile("n=1000", completions, _raw({"prompt": "hi", "max_tokens": 4, "n": 1000})),
        Hostile("20 MB body", completions, _raw({"prompt": "x" * 20 * 2**20, "max_tokens": 4})),
        Hostile(f"JSON nested {nested} deep", completions,
                b'{"prompt": ' + b"[" * nested + b"]" * nested + b', "max_tokens": 4}'),
        Hostile("unknown model", completions, _raw({"model": "gpt-17", "prompt": "hi", "max_tokens": 4})),
        Hostile("draft model /etc/passwd", completions,
                _raw({"prompt": "hi", "max_tokens": 4,
                      "speculation": {"method": "draft", "draft_model": "/etc/passwd"}})),
        Hostile("speculation '/etc/passwd'", completions,
                _raw({"prompt": "hi", "max_tokens": 4, "speculation": "/etc/passwd"})),
        Hostile("invalid UTF-8", completions, b'{"prompt": "a\xff\xfe\xc0b", "max_tokens": 4}'),
    ]
    if api_key:
        json_only = {"Content-Type": "application/json"}
        items += [Hostile("no Authorization header", completions, _raw({"prompt": "hi", "max_tokens": 4}), json_only),
                  Hostile("wrong API key", completions, _raw({"prompt": "hi", "max_tokens": 4}),
                          {**json_only, "Authorization": "Bearer not-the-key"})]
    return items


async def send_hostile(http: httpx.AsyncClient, item: Hostile, auth: dict, timeout: float) -> dict:
    """The status a hostile request got (it must be a 4xx), or what happened instead."""
    started = time.monotonic()
    headers = {"Content-Type": "application/json", **auth} if item.headers is None else item.headers
    try:
        response = await http.post(item.path, content=item.body, headers=headers, timeout=timeout)
        status, detail = response.status_code, _error_message(response)
    except httpx.TimeoutException:
        status, detail = None, f"no answer within {timeout:.0f} s"
    except httpx.TransportError as e:
        status, detail = None, f"{type(e).__name__}: {e}"
    return {"name": item.name, "status": status, "ok": status is not None and 400 <= status < 500,
            "seconds": round(time.monotonic() - started, 2), "detail": detail[:300]}


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


# -- the run ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Target:
    url: str
    api_key: str | None
    pid: int | None


async def soak(target: Target, a: argparse.Namespace, log) -> dict:
    auth = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(max_connections=a.clients + 4, max_keepalive_connections=a.clients + 4)
    timeout = httpx.Timeout(a.request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=target.url, headers=auth, limits=limits, timeout=timeout) as http, \
            httpx.AsyncClient(base_url=target.url, timeout=10) as probe:
        context = (await http.get("/v1/models")).json()["data"][0]["max_model_len"]
        tally, samples, began = Tally(), [], time.monotonic()
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_until(stop, probe, target.pid, began, a.sample_every, samples, log))
        log(f"load: {a.clients} clients for {a.duration:g} s")
        deadline = began + a.duration
        await asyncio.gather(*(client_loop(http, a.seed + i, deadline, tally) for i in range(a.clients)))
        load_seconds = time.monotonic() - began
        log(f"load done after {load_seconds:.0f} s: {sum(tally.by_kind.values())} requests; hostile requests")
        hostile = [await send_hostile(probe, item, auth, a.hostile_timeout)
                   for item in hostile_requests(target.api_key, context)]
        settled = await settle(probe, a.settle_timeout)
        stop.set()
        await sampler
        final = await sample(probe, target.pid, began)
        after = await greedy_after(http, tally)
    return {"load_seconds": round(load_seconds, 1), "tally": tally, "samples": samples, "hostile": hostile,
            "settle_seconds": settled, "final": final, "greedy_after": after}


async def settle(probe: httpx.AsyncClient, timeout: float) -> float | None:
    """Seconds until no sequence runs or waits and no KV block is held; None if that never came."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        point = await sample(probe, None, started)
        if point.get("running") == 0 and point.get("waiting") == 0 and point.get("kv_used_blocks") == 0:
            return round(time.monotonic() - started, 2)
        await asyncio.sleep(0.5)
    return None


async def greedy_after(http: httpx.AsyncClient, tally: Tally) -> list[dict]:
    """One greedy repeat per endpoint after the hostile requests: the server must answer as before."""
    results = []
    for endpoint in ("chat", "completions"):
        key = next((k for k in tally.greedy_answers if k.startswith(endpoint + " ")), None)
        if key is None:
            continue
        _, limit, prompt = key.split(" | ", 2)
        plan = Plan(endpoint, False, 1, True, prompt, int(limit.split()[1]))
        try:
            text = (await _exchange(http, plan, plan.body(random.Random(0)))).texts[0]
        except (_Status, Malformed, InBandError, httpx.TransportError) as e:
            text = f"<failed: {type(e).__name__}: {e}>"
        results.append({"key": key, "same": text == tally.greedy_answers[key]["text"], "text": text})
    return results


# -- judging ------------------------------------------------------------------------------------------

def rss_summary(samples: list[dict], load_seconds: float, final: dict, warmup: float) -> dict | None:
    """The RSS series, and the same less the KV pool's touched pages: the pool is memory the server was
    configured with, which its prefix cache fills over time (pages are resident once a block is first
    used), so growth beyond it is what a leak would show. Flatness is judged on the latter."""
    series = [(p["t"], p["rss"], p.get("kv_touched_bytes") or 0) for p in samples if p.get("rss")]
    if not series:
        return None
    window = min(RSS_WINDOW_S, load_seconds / 2)
    last = [(rss, touched) for t, rss, touched in series if load_seconds - window <= t <= load_seconds]
    after_warmup = next((rss for t, rss, _ in series if t >= warmup), series[-1][1])
    low, high = min(rss for rss, _ in last), max(rss for rss, _ in last)
    beyond = [rss - touched for rss, touched in last]
    return {"start": series[0][1], "after_warmup": after_warmup, "warmup_s": warmup, "end_of_load": last[-1][0],
            "final": final.get("rss"), "window_s": round(window, 1), "window_min": low, "window_max": high,
            "window_spread": round((high - low) / low, 4), "pool_touched_end": last[-1][1],
            "beyond_pool_min": min(beyond), "beyond_pool_max": max(beyond),
            "beyond_pool_spread": round((max(beyond) - min(beyond)) / min(beyond), 4), "samples": len(series)}


def judge(run: dict) -> dict[str, dict]:
    t, final, rss = run["tally"], run["final"], run["rss"]
    checks = {
        "no 5xx": (t.status_5xx == 0, f"{t.status_5xx} answers 5xx"),
        "every load answer 200": (not t.other_status, f"other statuses {dict(t.other_status) or 'none'}"),
        "well-formed": (t.malformed == 0, f"{t.malformed} malformed"),
        "none lost": (t.lost == 0, f"{t.lost} lost"),
        "greedy repeats identical": (t.mismatched == 0, f"{t.mismatched} of {t.greedy_texts} greedy texts "
                                                        f"mismatched, over {len(t.greedy_answers)} keys"),
        "hostile requests all 4xx": (all(h["ok"] for h in run["hostile"]),
                                     f"{sum(not h['ok'] for h in run['hostile'])} of {len(run['hostile'])} not 4xx"),
        "in-flight drained": (run["settle_seconds"] is not None, f"after {run['settle_seconds']} s"),
        "/health 200 after": (final.get("health") == 200, f"/health {final.get('health')}"),
        "KV pool idle after": (final.get("kv_used_blocks") == 0, f"{final.get('kv_used_blocks')} blocks in use"),
        "greedy unchanged after hostile": (all(g["same"] for g in run["greedy_after"]) and bool(run["greedy_after"]),
                                           f"{sum(g['same'] for g in run['greedy_after'])} of "
                                           f"{len(run['greedy_after'])} the same"),
    }
    if rss is not None:
        checks["RSS beyond the KV pool flat"] = (
            rss["beyond_pool_spread"] <= RSS_FLAT_TOLERANCE,
            f"last {rss['window_s']:g} s: {rss['beyond_pool_min'] / 2**20:.1f}-{rss['beyond_pool_max'] / 2**20:.1f} "
            f"MiB ({rss['beyond_pool_spread']:.1%}); whole RSS {rss['window_min'] / 2**20:.1f}-"
            f"{rss['window_max'] / 2**20:.1f} MiB ({rss['window_spread']:.1%}), "
            f"{rss['pool_touched_end'] / 2**20:.1f} MiB of the pool touched")
    return {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()}


def report(results: dict) -> str:
    t, rss = results["tally"], results["rss"]
    mib = (lambda b: f"{b / 2**20:.1f} MiB" if b else "?")
    lines = [f"# soak_serve: {results['meta']['date']}", "",
             f"{results['meta']['cpu']}; {results['config']['clients']} clients, {results['load_seconds']:g} s of load",
             "", f"requests: {t['total']} ({', '.join(f'{k} {v}' for k, v in sorted(t['by_kind'].items()))}); "
                 f"n=2 {t['n2']}, greedy {t['greedy']}, aborted on purpose {t['aborted']}",
             f"answers: ok {t['ok']}, 5xx {t['status_5xx']}, other non-200 {t['other_status'] or 0}, "
             f"malformed {t['malformed']}, lost {t['lost']}, greedy mismatched {t['greedy_mismatched']} "
             f"(over {t['greedy_keys']} keys)"]
    if rss:
        lines.append(f"RSS: start {mib(rss['start'])}, after warm-up ({rss['warmup_s']:g} s) "
                     f"{mib(rss['after_warmup'])}, "
                     f"end of load {mib(rss['end_of_load'])}, final {mib(rss['final'])}; last {rss['window_s']:g} s "
                     f"min {mib(rss['window_min'])} max {mib(rss['window_max'])} ({rss['window_spread']:.1%}); "
                     f"beyond the KV pool's touched {mib(rss['pool_touched_end'])}: {mib(rss['beyond_pool_min'])}-"
                     f"{mib(rss['beyond_pool_max'])} ({rss['beyond_pool_spread']:.1%})")
    final = results["final"]
    lines += [f"after: /health {final.get('health')}, KV blocks in use {final.get('kv_used_blocks')}, "
              f"drained after {results['settle_seconds']} s", "", "hostile requests:"]
    lines += [f"  {'ok  ' if h['ok'] else 'FAIL'} {h['status'] or '-':>4}  {h['name']}  ({h['seconds']} s) "
              f"{h['detail'][:110]}" for h in results["hostile"]]
    lines += ["", "checks:"]
    lines += [f"  {'ok  ' if c['ok'] else 'FAIL'} {name}: {c['detail']}" for name, c in results["checks"].items()]
    for kind, examples in results["examples"].items():
        lines += ["", f"examples of {kind}:"] + [f"  {e}" for e in examples]
    return "\n".join(lines)


# -- the server ---------------------------------------------------------------------------------------

def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_server(a: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, Target]:
    port, api_key = free_port(), secrets.token_urlsafe(16)
    command = [sys.executable, "-m", "forerun", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--quant", a.quant, "--api-key", api_key, "--log-level", "warning", *shlex.split(a.serve_args)]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if not wait_healthy(proc, url + "/health", a.start_timeout):
        stop_process(proc)
        raise SystemExit(f"the server did not start; its log:\n{log_path.read_text(errors='replace')[-3000:]}")
    return proc, Target(url, api_key, proc.pid)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default: %(default)s)")
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default: %(default)s)")
    p.add_argument("--url", help="a running server's root, on loopback (default: start one)")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    p.add_argument("--api-key", help="with --url: the server's API key")
    p.add_argument("--quant", default="q4", help="the started server's --quant (default: %(default)s)")
    p.add_argument("--serve-args", default="", help="more flags for the started server, e.g. '--threads 1'")
    p.add_argument("--sample-every", type=float, default=5, help="seconds between samples (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds after which RSS counts as warmed up (default: 60, at most a quarter of the run)")
    p.add_argument("--request-timeout", type=float, default=300,
                   help="seconds per request, past which it counts as lost (default: %(default)s)")
    p.add_argument("--hostile-timeout", type=float, default=30,
                   help="seconds per hostile request (default: %(default)s)")
    p.add_argument("--settle-timeout", type=float, default=120,
                   help="seconds to wait for in-flight work to end (default: %(default)s)")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds for the server to start")
    p.add_argument("--seed", type=int, default=0, help="the clients' request mix (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("soak-serve-out"),
                   help="directory for results.json, report.md and server.log (default: %(default)s)")
    a = p.parse_args(argv)
    if a.clients < 1 or a.duration <= 0:
        p.error("--clients must be >= 1 and --duration > 0")
    if a.url and not is_loopback(a.url):
        p.error(f"--url {a.url}: only a loopback address (127.0.0.0/8, ::1, localhost) may be soaked")
    if a.pid and not a.url:
        p.error("--pid goes with --url (a started server's pid is known)")
    a.warmup = min(60.0, a.duration / 4) if a.warmup is None else a.warmup
    return a


def main(argv: list[str] | None = None, log=print) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    proc = None
    if a.url:
        target = Target(a.url.rstrip("/"), a.api_key, a.pid)
    else:
        log("starting forerun serve ...")
        proc, target = start_server(a, a.out / "server.log")
    try:
        run = asyncio.run(soak(target, a, log))
    finally:
        if proc is not None:
            stop_process(proc)
    run["rss"] = rss_summary(run["samples"], run["load_seconds"], run["final"], a.warmup)
    results = assemble(a, target, run, proc)
    text = report(results)
    (a.out / "report.md").write_text(text + "\n", encoding="utf-8")
    (a.out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    log(text)
    log(f"\nwrote {a.out / 'results.json'} and {a.out / 'report.md'}")
    return 0 if all(c["ok"] for c in results["checks"].values()) else 1


def assemble(a: argparse.Namespace, target: Target, run: dict, proc: subprocess.Popen | None) -> dict:
    checks = judge(run)
    if proc is not None:  # a server that died under the load fails the soak however its answers looked
        clean = proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once it has shut down
        checks["server exited cleanly"] = {"ok": clean, "detail": f"exit status {proc.returncode}"}
    tally = run["tally"]
    meta = {"command": shlex.join(["python", "benchmarks/soak_serve.py", *sys.argv[1:]]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": os.cpu_count(), "python": platform.python_version(), "server": target.url,
            "started_here": proc is not None}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "api_key"}
    return {"meta": meta, "config": config, "load_seconds": run["load_seconds"], "tally": tally.summary(),
            "greedy_answers": tally.greedy_answers, "examples": tally.examples, "rss": run["rss"],
            "samples": run["samples"], "hostile": run["hostile"], "settle_seconds": run["settle_seconds"],
            "final": run["final"], "greedy_after": run["greedy_after"], "checks": checks}


if __name__ == "__main__":
    sys.exit(main())

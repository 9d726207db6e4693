"""`forerun bench-serve`: load on any OpenAI-compatible server, measured from the client side, in
the manner of `vllm bench serve`.

Each load level is one run: at a fixed concurrency (N clients, each sending its next request when
the last one ends), or at a request rate (Poisson or evenly spaced arrivals). Every request streams
a chat completion of a Spec-Bench question's first turn. Per request: time to first token (TTFT),
time per output token after the first (TPOT), gaps between streamed chunks (ITL), end-to-end
latency (E2E). Per run: request and output-token throughput, p50/p90/p99 of each latency,
goodput (completed requests per second that met every SLO) and failures. Output: results.json,
report.md and latency-vs-load.png.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from forerun.bench.datasets import Question
from forerun.plotting import figure, legend_outside, pyplot, save

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class Load:
    """One run's load: `concurrency` clients, or `rate` requests a second (inf: all at once)."""

    concurrency: int | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency is not None else f"rate {self.rate:g}/s"

    @property
    def x(self) -> float:
        return float(self.concurrency if self.concurrency is not None else self.rate)


@dataclass(frozen=True, slots=True)
class ServeBenchOptions:
    base_url: str  # the server's root, e.g. http://127.0.0.1:8000 (…/v1 is added)
    model: str | None
    questions: tuple[Question, ...]
    loads: tuple[Load, ...]
    num_prompts: int = 32  # requests per run
    max_tokens: int = 64
    temperature: float = 0.0
    arrival: str = "poisson"  # with rates: "poisson" or "fixed"
    slos_ms: tuple[tuple[str, float], ...] = ()  # ("ttft", 500.0), ("tpot", 50.0)
    api_key: str | None = None
    extra_body: tuple[tuple[str, object], ...] = ()  # merged into every request body
    warmup: int = 1  # requests before each run, not measured
    seed: int = 0
    timeout_s: float = 600.0
    label: str = ""  # names this server in the report
    command: str = ""


@dataclass(slots=True)
class RequestResult:
    ok: bool
    prompt_index: int
    start: float  # seconds since the run began
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    chunk_gaps_s: list[float] = field(default_factory=list)  # between content chunks after the first
    error: str | None = None
    text: str = ""  # the streamed content, joined

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


# -- running --------------------------------------------------------------------------------------------

def run_serve_bench(options: ServeBenchOptions, log=print) -> dict:
    """Every load in turn against the server; returns the results (as written to results.json)."""
    runs = []
    for level, load in enumerate(options.loads):
        results, seconds = run_load(options, load, level)
        summary = summarize(results, seconds, dict(options.slos_ms))
        runs.append({"load": asdict(load), "label": load.label, **summary})
        log(f"{load.label}: {summary['completed']} done, {summary['failed']} failed, "
            f"{summary['output_throughput']:.1f} output tok/s, TTFT p50 {summary['ttft_ms']['p50']} ms, "
            f"TPOT p50 {summary['tpot_ms']['p50']} ms")
    return {"server": options.base_url, "label": options.label, "model": options.model,
            "command": options.command, "num_prompts": options.num_prompts, "max_tokens": options.max_tokens,
            "temperature": options.temperature, "arrival": options.arrival, "slos_ms": dict(options.slos_ms),
            "extra_body": dict(options.extra_body), "runs": runs}


def run_load(options: ServeBenchOptions, load: Load, level: int = 0) -> tuple[list[RequestResult], float]:
    """One load level's requests and its wall seconds (warm-ups excluded)."""
    return asyncio.run(_run(options, load, level))


async def _run(options: ServeBenchOptions, load: Load, level: int) -> tuple[list[RequestResult], float]:
    """One load level. Each level asks the next questions of the list (wrapping around), and warm-up
    requests come from its end, so that a prompt seen before does not find its KV in a server's
    prefix cache while the list lasts."""
    import httpx

    questions = options.questions
    first = level * options.num_prompts
    prompts = [questions[(first + i) % len(questions)].turns[0] for i in range(options.num_prompts)]
    warmups = [questions[-1 - i % len(questions)].turns[0] for i in range(options.warmup)]
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    limits = httpx.Limits(max_connections=max(load.concurrency or 0, 64), max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=options.base_url.rstrip("/") + "/v1", headers=headers, limits=limits,
                                 timeout=options.timeout_s) as http:
        for i, prompt in enumerate(warmups):
            await _request(http, options, prompt, i, time.perf_counter())
        begin = time.perf_counter()
        if load.concurrency is not None:
            results = await _at_concurrency(http, options, prompts, load.concurrency, begin)
        else:
            results = await _at_rate(http, options, prompts, load.rate, begin)
        return results, time.perf_counter() - begin


async def _at_concurrency(http, options, prompts: list[str], clients: int, begin: float) -> list[RequestResult]:
    queue = list(enumerate(prompts))[::-1]
    results = []

    async def client():
        while queue:
            i, prompt = queue.pop()
            results.append(await _request(http, options, prompt, i, begin))

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


async def _at_rate(http, options, prompts: list[str], rate: float, begin: float) -> list[RequestResult]:
    rng = random.Random(options.seed)
    tasks, at = [], 0.0
    for i, prompt in enumerate(prompts):
        delay = at - (time.perf_counter() - begin)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_request(http, options, prompt, i, begin)))
        if math.isfinite(rate):
            at += rng.expovariate(rate) if options.arrival == "poisson" else 1.0 / rate
    return list(await asyncio.gather(*tasks))


async def _request(http, options: ServeBenchOptions, prompt: str, index: int, begin: float) -> RequestResult:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": options.max_tokens,
            "temperature": options.temperature, "stream": True, "stream_options": {"include_usage": True},
            **dict(options.extra_body)}
    if options.model:
        body["model"] = options.model
    start = time.perf_counter()
    result = RequestResult(ok=False, prompt_index=index, start=start - begin)
    last = None
    chunks = 0
    texts = []
    try:
        async with http.stream("POST", "/chat/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens", result.output_tokens)
                content = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or ())
                if content:
                    texts.append(content)
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.chunk_gaps_s.append(now - last)
                    last = now
                    chunks += 1
    except Exception as e:  # noqa: BLE001  (a failed request is counted, the run goes on)
        result.error = f"{type(e).__name__}: {e}"[:200]
        return result
    result.e2e_s = time.perf_counter() - start
    result.text = "".join(texts)
    result.output_tokens = result.output_tokens or chunks  # a server without usage: one token a chunk
    result.ok = result.ttft_s is not None
    if not result.ok:
        result.error = "no content streamed"
    return result


# -- numbers --------------------------------------------------------------------------------------------

def percentiles_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ordered = sorted(values)
    out = {"mean": round(statistics.fmean(ordered) * 1000, 2)}
    for p in PERCENTILES:
        out[f"p{p}"] = round(_percentile(ordered, p) * 1000, 2)
    return out


def _percentile(ordered: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


SLO_NAMES = ("ttft", "tpot", "e2e")


def meets_slos(r: RequestResult, slos_ms: dict[str, float]) -> bool:
    if not r.ok:
        return False
    got = {"ttft": r.ttft_s, "tpot": r.tpot_s, "e2e": r.e2e_s}
    for name, limit in slos_ms.items():
        if got[name] is None:  # only TPOT can be missing: a one-token answer has none, and passes
            continue
        if got[name] * 1000 > limit:
            return False
    return True


def parse_slos(words: list[str]) -> tuple[tuple[str, float], ...]:
    """["ttft:500", "tpot:50"] -> (("ttft", 500.0), ("tpot", 50.0)), in milliseconds."""
    slos = []
    for word in words:
        name, _, value = word.partition(":")
        if name not in SLO_NAMES or not value:
            raise ValueError(f"--goodput takes NAME:MS with NAME in {', '.join(SLO_NAMES)}, got {word!r}")
        try:
            slos.append((name, float(value)))
        except ValueError:
            raise ValueError(f"--goodput {word!r}: {value!r} is not a number of milliseconds") from None
    return tuple(slos)


def parse_loads(concurrency: str | None, rates: str | None) -> tuple[Load, ...]:
    """"1,4,16" concurrencies, or "0.5,2,inf" request rates."""
    if concurrency and rates:
        raise ValueError("give --concurrency or --request-rate, not both")
    try:
        if rates:
            loads = tuple(Load(rate=float(r)) for r in rates.split(","))
            if any(not load.rate > 0 for load in loads):
                raise ValueError
            return loads
        loads = tuple(Load(concurrency=int(c)) for c in (concurrency or "1").split(","))
    except ValueError:
        raise ValueError("--concurrency takes whole numbers >= 1 and --request-rate positive numbers "
                         "(or inf), comma-separated") from None
    if any(load.concurrency < 1 for load in loads):
        raise ValueError("--concurrency takes whole numbers >= 1")
    return loads


def summarize(results: list[RequestResult], seconds: float, slos_ms: dict[str, float]) -> dict:
    done = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in done)
    good = [r for r in done if meets_slos(r, slos_ms)] if slos_ms else done
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "duration_s": round(seconds, 3), "completed": len(done), "failed": len(results) - len(done),
        "errors": errors, "output_tokens": tokens,
        "request_throughput": round(len(done) / seconds, 4) if seconds else 0.0,
        "output_throughput": round(tokens / seconds, 3) if seconds else 0.0,
        "goodput": round(len(good) / seconds, 4) if seconds else 0.0,
        "ttft_ms": percentiles_ms([r.ttft_s for r in done]),
        "tpot_ms": percentiles_ms([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_ms": percentiles_ms([g for r in done for g in r.chunk_gaps_s]),
        "e2e_ms": percentiles_ms([r.e2e_s for r in done]),
    }


# -- report ---------------------------------------------------------------------------------------------

def write_outputs(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "report.md"]
    paths[0].write_text(json.dumps(result, indent=2))
    plot = write_plot(result, out / "latency-vs-load.png")
    paths[1].write_text(report_markdown(result, plot.name if plot else None))
    return paths + ([plot] if plot else [])


def report_markdown(result: dict, plot: str | None = None) -> str:
    slos = ", ".join(f"{k} <= {v:g} ms" for k, v in result["slos_ms"].items()) or "none (goodput = throughput)"
    lines = [f"# Serving benchmark: {result['label'] or result['server']}", "",
             f"- server: {result['server']}, model: {result['model'] or '(server default)'}",
             f"- {result['num_prompts']} requests per run, max_tokens {result['max_tokens']}, "
             f"temperature {result['temperature']}, streamed chat completions", f"- SLOs: {slos}"]
    if result["extra_body"]:
        lines.append(f"- extra body: `{json.dumps(result['extra_body'])}`")
    if result["command"]:
        lines.append(f"- command: `{result['command']}`")
    lines += ["", "| load | done | failed | req/s | output tok/s | goodput req/s | TTFT p50 / p90 / p99 ms "
              "| TPOT p50 / p90 / p99 ms | ITL p50 / p99 ms | E2E p50 / p99 ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        t, p, i, e = run["ttft_ms"], run["tpot_ms"], run["itl_ms"], run["e2e_ms"]
        lines.append(f"| {run['label']} | {run['completed']} | {run['failed']} | {run['request_throughput']:.2f} | "
                     f"{run['output_throughput']:.1f} | {run['goodput']:.2f} | {_ms(t, 50, 90, 99)} | "
                     f"{_ms(p, 50, 90, 99)} | {_ms(i, 50, 99)} | {_ms(e, 50, 99)} |")
    failures = [f"- {run['label']}: {n} x {err}" for run in result["runs"] for err, n in run["errors"].items()]
    if failures:
        lines += ["", "Failures:", *failures]
    if plot:
        lines += ["", f"![latency vs load]({plot})"]
    return "\n".join(lines) + "\n"


def _ms(values: dict, *ps: int) -> str:
    return " / ".join("-" if values[f"p{p}"] is None else f"{values[f'p{p}']:.0f}" for p in ps)


def write_plot(result: dict, path: Path) -> Path | None:
    """TTFT, TPOT and end-to-end latency percentiles against the load level (concurrency or request rate)."""
    plt = pyplot()
    if plt is None:
        return None
    runs = result["runs"]
    xs = [Load(**run["load"]).x for run in runs]
    by_concurrency = runs and runs[0]["load"]["concurrency"] is not None
    fig, axes = figure(plt, 15, 5.5, ncols=3)
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"),
                              ("time to first token", "time per output token", "end-to-end latency")):
        for p, style in zip(PERCENTILES, ("o-", "s--", "^:")):
            ys = [run[key][f"p{p}"] for run in runs]
            ax.plot(xs, [math.nan if y is None else y for y in ys], style, label=f"p{p}")
        ax.set_title(title)
        ax.set_xlabel("concurrent clients" if by_concurrency else "request rate (requests/s)")
        ax.set_ylabel("milliseconds")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency percentiles against load: {result['label'] or result['server']}")
    legend_outside(fig, axes[0])
    save(plt, fig, path)
    return path


# -- server processes (the peer benchmark and the server tests start their own) ---------------------


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, health_url: str, timeout: float, poll: float = 0.2) -> bool:
    """Poll health_url until it answers 200 (True); False once proc exits or timeout passes."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(health_url, timeout=5).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(poll)
    return False


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM (a server drains its requests), then kill after timeout; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode

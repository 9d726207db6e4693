"""`forerun serve` against the engine it wraps, side by side: what the HTTP layer costs.

The same prompts (Spec-Bench first turns through the chat template, greedy, the embedded model in
q4 unless --server-arg says otherwise) go through

  engine   the engine in this process, with `c` requests in flight (a finished request's place goes
           to the next prompt at once, as a server's clients do)
  server   a `forerun serve` subprocess on loopback with the same flags, loaded by `forerun bench-serve`'s
           load generator (forerun.bench.serving): `c` clients streaming chat completions

in alternating rounds (engine, server, engine, server, ...), each round on its own slice of the
shuffled question list, the same slice for both sides; one untimed warm-up round each first. Both
sides read their configuration from the same `forerun serve` flags. Prints, per concurrency, the
median output tok/s of each side, the median of per-round server/engine ratios, CPU seconds per round
(the engine; the server process; this process's HTTP client) and the server's output tokens per CPU
second (with its client's) over the engine's, which holds on a machine whose other work takes a
varying share of the cores from one round to the next, and checks that both sides produced the
same token counts and texts (greedy) and that the server's prompt token ids are the engine's.

    python benchmarks/serve_vs_engine.py --out serve-vs-engine-out
    python benchmarks/serve_vs_engine.py --concurrency 1,4 --num-prompts 16 --rounds 3
    python benchmarks/serve_vs_engine.py --method pld
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from forerun.bench.datasets import Question, load_questions
from forerun.bench.harness import machine_description, versions
from forerun.bench.serving import Load, ServeBenchOptions, free_port, run_load, stop_process, wait_healthy
from forerun.cli_args import engine_config, model_options, spec_config
from forerun.config import SamplingParams, SpecConfig
from forerun.llm import LLM
from forerun.serve.cli import add_serve_parser

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Round:
    """One side's run over one slice of prompts."""

    side: str  # "engine" or "server"
    concurrency: int
    round: int  # 0 is the warm-up
    wall_s: float
    tokens: int  # output tokens, summed over the slice
    cpu_s: float  # the engine's (this process), or the server process's
    client_cpu_s: float  # this process's, while the server ran (the HTTP client); 0 for the engine
    texts: tuple[str, ...]  # in prompt order
    token_counts: tuple[int, ...]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


def serve_flags(a: argparse.Namespace) -> list[str]:
    return ["--quant", a.quant, "--method", a.method, *a.server_arg]


def parse_serve(flags: list[str]) -> argparse.Namespace:
    """The flags as `forerun serve` reads them, so the in-process engine is configured identically."""
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *flags])


def engine_round(llm: LLM, prompts: list[list[int]], params: SamplingParams, spec: SpecConfig,
                 concurrency: int, number: int) -> Round:
    """The prompts through the engine, `concurrency` requests in flight."""
    engine, queue, order, done = llm.engine, list(enumerate(prompts))[::-1], {}, {}
    cpu, start = time.process_time(), time.perf_counter()
    while queue or engine.has_unfinished():
        while queue and len(order) - len(done) < concurrency:
            i, prompt = queue.pop()
            order[engine.add_request(prompt, params, spec)] = i
        for out in engine.step():
            if out.finished:
                done[order[out.request_id]] = out.generations[0]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    generations = [done[i] for i in range(len(prompts))]
    counts = tuple(len(g.token_ids) for g in generations)
    return Round("engine", concurrency, number, wall, sum(counts), cpu, 0.0, tuple(g.text for g in generations),
                 counts)


def server_round(base_url: str, pid: int, questions: list[Question], max_tokens: int, concurrency: int,
                 number: int) -> Round:
    options = ServeBenchOptions(base_url=base_url, model=None, questions=tuple(questions),
                                loads=(Load(concurrency=concurrency),), num_prompts=len(questions),
                                max_tokens=max_tokens, temperature=0.0, warmup=0)
    server_cpu, client_cpu = process_cpu_s(pid), time.process_time()
    results, wall = run_load(options, options.loads[0])
    server_cpu, client_cpu = process_cpu_s(pid) - server_cpu, time.process_time() - client_cpu
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} server requests failed, e.g. {failed[0]}")
    by_prompt = sorted(results, key=lambda r: r.prompt_index)
    counts = tuple(r.output_tokens for r in by_prompt)
    return Round("server", concurrency, number, wall, sum(counts), server_cpu, client_cpu,
                 tuple(r.text for r in by_prompt), counts)


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def start_server(flags: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "forerun", "serve", "--port", str(port), "--log-level", "warning", *flags]
    proc = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO)
    base_url = f"http://127.0.0.1:{port}"
    if not wait_healthy(proc, base_url + "/health", 600, poll=0.5):
        stop_process(proc)
        raise RuntimeError(f"the server did not come up; see {log}")
    return proc, base_url


def server_prompt_ids(base_url: str, questions: list[Question]) -> list[list[int]]:
    import httpx

    with httpx.Client(base_url=base_url, timeout=60) as http:
        return [http.post("/tokenize", json={"messages": [{"role": "user", "content": q.turns[0]}]}).json()["tokens"]
                for q in questions]


def slices(questions: list[Question], size: int, count: int, start: int) -> list[list[Question]]:
    """`count` consecutive slices of `size` questions from slice `start` on, wrapping around the list."""
    return [[questions[(k * size + i) % len(questions)] for i in range(size)] for k in range(start, start + count)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="16", help="comma-separated levels (default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=48, help="prompts per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side and level (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--quant", default="q4")
    p.add_argument("--method", default="ar")
    p.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                   help="another `forerun serve` flag for both sides, e.g. --server-arg=--threads=1 (repeatable)")
    p.add_argument("--dataset", type=Path, default=DATASET)
    p.add_argument("--seed", type=int, default=0, help="shuffles the question list (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("serve-vs-engine-out"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in a.concurrency.split(",")]
    flags = serve_flags(a)
    serve = parse_serve(flags)
    questions = load_questions(str(a.dataset))
    random.Random(a.seed).shuffle(questions)  # the file runs category by category: mix them in every slice
    params, spec = SamplingParams(max_new_tokens=a.max_tokens, temperature=0.0), spec_config(serve)
    if serve.threads is not None:  # as `forerun serve --threads` sets it for its engine
        torch.set_num_threads(serve.threads)
    llm = LLM(serve.model, engine=engine_config(serve), **model_options(serve))
    machine = machine_description()
    print(f"machine: {machine}\n{versions()}\nserve flags: {shlex.join(flags)}", file=sys.stderr)
    proc, base_url = start_server(flags, a.out / "server.log")
    rounds: list[Round] = []
    ids_differ = 0
    try:
        first = 0
        for level in levels:
            level_slices = slices(questions, a.num_prompts, a.rounds + 1, first)
            first += a.rounds + 1
            for number, part in enumerate(level_slices):
                ids = [llm.encode([{"role": "user", "content": q.turns[0]}]) for q in part]
                ids_differ += sum(x != y for x, y in zip(ids, server_prompt_ids(base_url, part)))
                pair = (engine_round(llm, ids, params, spec, level, number),
                        server_round(base_url, proc.pid, part, a.max_tokens, level, number))
                rounds += pair
                write_results(a.out / "results.json", rounds, machine, flags, ids_differ)
                print(f"c={level} round {number}{' (warm-up)' if number == 0 else ''}: "
                      + ", ".join(f"{r.side} {r.tok_s:.1f} tok/s ({r.tokens} tokens, {r.wall_s:.2f} s)" for r in pair)
                      + f", server/engine {pair[1].tok_s / pair[0].tok_s:.3f}x", file=sys.stderr)
    finally:
        stop_process(proc)
    report = markdown(rounds, levels, a, machine, command_line(), ids_differ)
    (a.out / "summary.md").write_text(report)
    print(report)
    return 0 if ids_differ == 0 and not any(differences(rounds, level)[1] for level in levels) else 1


def command_line() -> str:
    return "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def write_results(path: Path, rounds: list[Round], machine: str, flags: list[str], ids_differ: int) -> None:
    """Every round so far (written after each, so a long run on a busy machine keeps what it measured)."""
    path.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
        "versions": versions(), "command": command_line(), "serve_flags": flags, "prompt_ids_differ": ids_differ,
        "rounds": [{**asdict(r), "tok_s": r.tok_s} for r in rounds]}, indent=1))


def differences(rounds: list[Round], level: int) -> tuple[int, int]:
    """Prompts whose output token counts differ between the sides, and prompts whose texts differ."""
    counts = texts = 0
    timed = [r for r in rounds if r.concurrency == level]
    for engine, server in zip(timed[::2], timed[1::2]):
        counts += sum(x != y for x, y in zip(engine.token_counts, server.token_counts))
        texts += sum(x != y for x, y in zip(engine.texts, server.texts))
    return counts, texts


def markdown(rounds: list[Round], levels: list[int], a: argparse.Namespace, machine: str, command: str,
             ids_differ: int) -> str:
    lines = [f"- machine: {machine}", f"- command: `{command}`",
             f"- `forerun serve {shlex.join(serve_flags(a))}` and the engine in-process with the same flags; "
             f"{a.num_prompts} Spec-Bench first turns a round (a new slice each round, the same for both sides), "
             f"max_tokens {a.max_tokens}, greedy; {a.rounds} timed rounds a side after one warm-up, alternating", "",
             "| concurrency | engine tok/s | server tok/s | server / engine | engine CPU s | server CPU s "
             "| client CPU s | server / engine per CPU second | tokens (engine = server) | token counts differ "
             "| texts differ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for level in levels:
        timed = [r for r in rounds if r.concurrency == level and r.round > 0]
        engine, server = timed[::2], timed[1::2]
        ratios = [s.tok_s / e.tok_s for e, s in zip(engine, server)]
        per_cpu = [(s.tokens / (s.cpu_s + s.client_cpu_s)) / (e.tokens / e.cpu_s) for e, s in zip(engine, server)]
        counts, texts = differences(rounds, level)
        median = lambda side, key: statistics.median(getattr(r, key) for r in side)  # noqa: E731
        lines.append(f"| {level} | {median(engine, 'tok_s'):.1f} | {median(server, 'tok_s'):.1f} | "
                     f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) | "
                     f"{median(engine, 'cpu_s'):.2f} | {median(server, 'cpu_s'):.2f} | "
                     f"{median(server, 'client_cpu_s'):.2f} | {statistics.median(per_cpu):.3f}x | "
                     f"{sum(r.tokens for r in engine)} = "
                     f"{sum(r.tokens for r in server)} | {counts} | {texts} |")
    lines += ["", "Medians over the timed rounds; the ratio is the median of per-round ratios (its range in "
              "brackets); CPU seconds per round; per CPU second: output tokens per CPU second of the server and "
              "its client together over the engine's, the median of per-round ratios (what the server's own work "
              f"costs, whatever share of the cores the machine gave each side). Server prompt ids differing from "
              f"the engine's: {ids_differ}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

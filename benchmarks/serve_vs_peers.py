"""forerun serve against llama.cpp's own server, measured the same way: `forerun bench-serve` streams
Spec-Bench prompts at each concurrency level to each server in turn (one server up at a time, so
they never share the CPU), on the same weights (the embedded SmolLM2-135M-Instruct GGUF; forerun
runs its q4 blocks on its native kernels). Contenders:

  forerun-ar            forerun serve --quant q4 --method ar
  forerun-pld-goodput   forerun serve --quant q4 --method pld --budget goodput
  llama.cpp             llama-server -m THE_GGUF -np C (C parallel slots at concurrency C), if found

Writes each contender's bench-serve output under --out/<name>/ and prints a markdown table of output
tok/s, p50 TTFT, p50 TPOT and goodput per level, with the ratios the targets are stated in.

Servers measured one after another see different moments of a shared machine, and at concurrency 1
the difference between `ar` and a speculative server is a few percent. `--alternate N` measures that
difference side by side instead: both forerun servers up at once, N Spec-Bench first turns spread
over all categories, each sent to one server then the other (order swapped every prompt), one
request in flight at a time; it prints each server's tok/s, the ratio of total wall times and the
median of per-prompt ratios, and checks the texts are equal (greedy).

    python benchmarks/serve_vs_peers.py --out serve-bench-out
    python benchmarks/serve_vs_peers.py --llama-server /path/to/llama-server --concurrency 1,4,16
    python benchmarks/serve_vs_peers.py --alternate 52
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from forerun.bench.serving import free_port, stop_process, wait_healthy

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
FORERUN = {"forerun-ar": ["--quant", "q4", "--method", "ar"],
           "forerun-pld-goodput": ["--quant", "q4", "--method", "pld", "--budget", "goodput"]}


def start(command: list[str], log: Path, ready_path: str, port: int, timeout: float = 600) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO)
    if wait_healthy(proc, f"http://127.0.0.1:{port}{ready_path}", timeout, poll=0.5):
        return proc
    if proc.poll() is not None:
        raise RuntimeError(f"{command[0]} exited with {proc.returncode}; see {log}")
    proc.kill()
    raise TimeoutError(f"{command[0]} was not ready after {timeout}s; see {log}")


def bench(port: int, name: str, levels: str, a: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, "-m", "forerun", "bench-serve", "--base-url", f"http://127.0.0.1:{port}",
               "--dataset", str(a.dataset), "--num-prompts", str(a.num_prompts), "--max-tokens", str(a.max_tokens),
               "--concurrency", levels, "--goodput", *a.goodput, "--label", name, "--out", str(out)]
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dataset", type=Path, default=DATASET)
    p.add_argument("--goodput", nargs="*", default=["ttft:1000", "tpot:100"])
    p.add_argument("--llama-server", default=shutil.which("llama-server"), help="path (default: on PATH)")
    p.add_argument("--threads", type=int, default=2, help="llama-server threads (default: %(default)s)")
    p.add_argument("--only", default="", help="comma-separated contenders to run (default: all)")
    p.add_argument("--alternate", type=int, default=0, metavar="N",
                   help="instead: the two forerun servers side by side at concurrency 1 over N prompts")
    p.add_argument("--out", type=Path, default=Path("serve-bench-out"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.alternate:
        return alternate(a)
    only = set(filter(None, a.only.split(",")))
    results: dict[str, dict[int, dict]] = {}
    for name, flags in FORERUN.items():
        if only and name not in only:
            continue
        port = free_port()
        proc = start([sys.executable, "-m", "forerun", "serve", "--port", str(port), *flags],
                     a.out / f"{name}.log", "/health", port)
        try:
            result = bench(port, name, a.concurrency, a, a.out / name)
        finally:
            stop_process(proc)
        results[name] = {run["load"]["concurrency"]: run for run in result["runs"]}
    if a.llama_server and (not only or "llama.cpp" in only):
        from forerun.models.embedded import embedded_gguf_path

        results["llama.cpp"] = {}
        for level in a.concurrency.split(","):  # as many parallel slots as clients
            port = free_port()
            proc = start([a.llama_server, "-m", str(embedded_gguf_path()), "--host", "127.0.0.1", "--port", str(port),
                          "-np", level, "-c", str(int(level) * 2048), "-t", str(a.threads)],
                         a.out / f"llama.cpp-{level}.log", "/health", port)
            try:
                result = bench(port, "llama.cpp", level, a, a.out / f"llama.cpp-{level}")
            finally:
                stop_process(proc)
            results["llama.cpp"][int(level)] = result["runs"][0]
    elif not only or "llama.cpp" in only:
        print("llama-server not found (pass --llama-server PATH): llama.cpp left out", file=sys.stderr)
    table = markdown(results, a)
    (a.out / "summary.md").write_text(table)
    print(table)
    return 0


def alternate(a: argparse.Namespace) -> int:
    import httpx

    questions = [json.loads(line) for line in a.dataset.read_text().splitlines() if line.strip()]
    step = max(len(questions) // a.alternate, 1)  # spread over the file, which is grouped by category
    prompts = [q["turns"][0] for q in questions[::step][:a.alternate]]
    servers, procs = {}, []
    try:
        for name, flags in FORERUN.items():
            port = free_port()
            procs.append(start([sys.executable, "-m", "forerun", "serve", "--port", str(port), *flags],
                               a.out / f"{name}.log", "/health", port))
            servers[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
        walls = {name: [] for name in servers}
        tokens = dict.fromkeys(servers, 0)
        with httpx.Client(timeout=600) as http:
            def ask(name: str, text: str) -> str:
                start_s = time.perf_counter()
                body = http.post(servers[name], json={"messages": [{"role": "user", "content": text}],
                                                      "max_tokens": a.max_tokens, "temperature": 0}).json()
                walls[name].append(time.perf_counter() - start_s)
                tokens[name] += body["usage"]["completion_tokens"]
                return body["choices"][0]["message"]["content"]

            for name in servers:  # warm-up, not counted
                ask(name, questions[-1]["turns"][0])
                walls[name].clear()
                tokens[name] = 0
            differ = 0
            for i, text in enumerate(prompts):
                order = list(servers) if i % 2 == 0 else list(servers)[::-1]
                texts = {name: ask(name, text) for name in order}
                differ += len(set(texts.values())) > 1
    finally:
        for proc in procs:
            stop_process(proc)
    base, other = "forerun-ar", "forerun-pld-goodput"
    lines = [f"{len(prompts)} Spec-Bench first turns (every {step}th question), max_tokens {a.max_tokens}, greedy, "
             "concurrency 1, the two servers alternating per prompt", "",
             "| server | output tok/s | total wall s |", "|---|---|---|"]
    lines += [f"| {name} | {tokens[name] / sum(w):.1f} | {sum(w):.2f} |" for name, w in walls.items()]
    ratios = [x / y for x, y in zip(walls[base], walls[other])]
    lines += ["", f"{other} vs {base}: {sum(walls[base]) / sum(walls[other]):.3f}x (ratio of total wall times), "
              f"{statistics.median(ratios):.3f}x (median of per-prompt ratios); texts differ on {differ} of "
              f"{len(prompts)} prompts"]
    table = "\n".join(lines) + "\n"
    (a.out / "alternate.md").write_text(table)
    print(table)
    return 0 if differ == 0 else 1


def markdown(results: dict[str, dict[int, dict]], a: argparse.Namespace) -> str:
    lines = [f"{a.num_prompts} streamed chat completions per level, max_tokens {a.max_tokens}, Spec-Bench prompts, "
             f"greedy; goodput SLOs: {' '.join(a.goodput)}", "",
             "| contender | concurrency | output tok/s | TTFT p50 ms | TPOT p50 ms | goodput req/s | failed |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        for level, run in sorted(runs.items()):
            lines.append(f"| {name} | {level} | {run['output_throughput']:.1f} | {run['ttft_ms']['p50']} | "
                         f"{run['tpot_ms']['p50']} | {run['goodput']:.3f} | {run['failed']} |")
    lines += ["", "| ratio | " + " | ".join(f"c={c}" for c in sorted(next(iter(results.values()), {}))) + " |",
              "|---|" + "---|" * len(next(iter(results.values()), {}))]
    for top, bottom, key in (("forerun-ar", "llama.cpp", "output_throughput"),
                             ("forerun-pld-goodput", "llama.cpp", "output_throughput"),
                             ("forerun-pld-goodput", "forerun-ar", "output_throughput"),
                             ("forerun-pld-goodput", "forerun-ar", "goodput")):
        if top in results and bottom in results:
            cells = [f"{results[top][c][key] / results[bottom][c][key]:.2f}x" if results[bottom].get(c)
                     and results[bottom][c][key] else "-" for c in sorted(results[top])]
            lines.append(f"| {top} / {bottom} {key.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""`forerun serve`: arguments -> EngineConfig, SpecConfig, ServeConfig -> uvicorn; and `forerun
bench-serve`, its load generator (forerun.bench.serving). Wired into forerun/cli.py by
add_serve_parsers(subparsers).

The model, engine and speculation flags are `forerun generate`'s (forerun.cli_args; sampling flags
stay per request) and go through the same engine_config() and spec_config()."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from forerun.cli_args import (add_engine_args, add_model_args, add_speculation_args, engine_config, model_options,
                              spec_config)
from forerun.serve import DEFAULT_MAX_SCALING_JOBS

if TYPE_CHECKING:  # the app needs fastapi, which `forerun serve --help` does not
    from forerun.serve.app import ServeConfig

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
API_KEY_VARIABLE = "FORERUN_API_KEY"  # the server's key, kept out of its command line (which ps shows)
CLIENT_KEY_VARIABLE = "OPENAI_API_KEY"  # bench-serve's, as the openai client reads it


def add_serve_parsers(subparsers) -> None:
    """`forerun serve` and `forerun bench-serve` (a separate command: `forerun bench` has its own flags)."""
    add_serve_parser(subparsers)
    add_bench_serve_parser(subparsers)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible HTTP API (completions, chat, models, metrics)",
        description="An OpenAI-compatible server on the batched engine, with exact speculative decoding. "
                    "Requests may override the speculation with a `speculation` object in extra_body.")
    add_model_args(p)
    add_engine_args(p)
    add_speculation_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on the API routes (default: ${API_KEY_VARIABLE} if set, "
                        "which keeps the key out of the command line that other users of the machine can read)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: --model as given, or SmolLM2-135M-Instruct)")
    p.add_argument("--allow-draft-model", action="append", default=[], metavar="PATH",
                   help="a draft model (HF directory or .gguf) requests may name as speculation.draft_model, "
                        "besides --draft-model (repeatable); each is loaded once at start-up. Requests naming "
                        "any other path get a 400")
    p.add_argument("--generation-config", default="auto", metavar="{auto,none,vllm,FOLDER}",
                   help="auto (default): sampling fields a request leaves unset (temperature, top_p, top_k, "
                        "max_tokens) take the values of the model's generation_config.json, as vLLM does; "
                        "none (or vLLM's `vllm`): OpenAI's defaults; FOLDER: the values of "
                        "FOLDER/generation_config.json")
    p.add_argument("--max-scaling-jobs", type=int, default=DEFAULT_MAX_SCALING_JOBS,
                   help="chat requests with a `scaling` strategy running at once; one more is answered 429 with "
                        "Retry-After (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the engine's forwards (default: torch's choice, one per core); "
                        "on a small CPU one fewer leaves a core to the HTTP event loop")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def served_name(a: argparse.Namespace) -> str:
    return a.served_model_name or a.model or EMBEDDED_NAME


def serve_config(a: argparse.Namespace, spec) -> ServeConfig:
    from forerun.serve.app import ServeConfig

    if a.max_scaling_jobs < 1:
        raise ValueError(f"--max-scaling-jobs must be >= 1, got {a.max_scaling_jobs}")
    return ServeConfig(served_name(a), spec, key_of(a.api_key, API_KEY_VARIABLE), max_scaling_jobs=a.max_scaling_jobs,
                       draft_models=tuple(a.allow_draft_model), generation_config=a.generation_config)


def key_of(flag: str | None, variable: str) -> str | None:
    """The API key: the flag's, else the environment variable's; None (no key) when neither is set
    or the one given is empty."""
    return (flag if flag is not None else os.environ.get(variable)) or None


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"forerun serve needs {e.name}: pip install 'forerun[serve]'") from None

    from forerun.models.runtime import resolve_quant
    from forerun.serve.app import create_app

    spec, limits = spec_config(a), engine_config(a)  # bad flags fail here, before anything loads
    config = serve_config(a, spec)
    if a.quant != "auto":  # auto needs the model file, read when it loads
        resolve_quant(a.quant, a.model, a.dtype, a.device)
    if not 0 <= a.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {a.port}")
    if a.threads is not None:
        if a.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {a.threads}")
        import torch

        torch.set_num_threads(a.threads)
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), format="%(levelname)s:     %(name)s: %(message)s")
    server: uvicorn.Server | None = None

    def load():
        from forerun.engine.engine import Engine
        from forerun.models.runtime import load as load_runtime

        logging.getLogger("forerun.serve").info("loading %s", a.model or f"{EMBEDDED_NAME} (embedded)")
        runtime = load_runtime(a.model, **model_options(a))
        if runtime.tokenizer is None:
            raise ValueError("serving needs a model with a tokenizer")
        return Engine(runtime, limits)

    def failed(reason: str) -> None:  # the engine cannot serve: exit (a supervisor may restart it)
        if server is not None:
            server.should_exit = True

    app = create_app(load, config, on_failure=failed)
    server = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level,
                                           timeout_graceful_shutdown=None))
    server.run()
    if app.state.worker.failed is not None:
        print(f"forerun serve: error: {app.state.worker.failed}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


def add_bench_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench-serve", help="load an OpenAI-compatible server and measure latency and throughput",
        description="Stream chat completions of Spec-Bench questions to any OpenAI-compatible server at given "
                    "concurrencies or request rates; report throughput, TTFT/TPOT/ITL/E2E percentiles and "
                    "goodput, and write results.json, report.md and latency-vs-load.png into --out.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's root (default: %(default)s)")
    p.add_argument("--model", help="model name to send (default: none; the server's own)")
    p.add_argument("--dataset", help="Spec-Bench-format JSONL, e.g. ../shared/data/spec_bench/question.jsonl "
                                     "(default: the built-in prompt set)")
    p.add_argument("--categories", help="only these categories, comma-separated")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per load level (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="(default: greedy)")
    p.add_argument("--concurrency", help="comma-separated client counts, e.g. 1,4,16 (default: 1)")
    p.add_argument("--request-rate", help="comma-separated request rates per second, e.g. 0.5,2,inf")
    p.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson",
                   help="arrivals at a request rate (default: %(default)s)")
    p.add_argument("--goodput", nargs="*", default=[], metavar="NAME:MS",
                   help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 (names: ttft, tpot, e2e)")
    p.add_argument("--api-key", help=f"sent as `Authorization: Bearer KEY` (default: ${CLIENT_KEY_VARIABLE} if set)")
    p.add_argument("--extra-body", default="{}",
                   help='JSON merged into every request, e.g. \'{"speculation": {"method": "ar"}}\'')
    p.add_argument("--label", default="", help="names the server in the report")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests before each level (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="prompt order and Poisson arrivals (default: 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--out", default="bench-serve-out", help="output directory (default: %(default)s)")
    p.set_defaults(func=cmd_bench_serve)
    return p


def cmd_bench_serve(a: argparse.Namespace) -> int:
    import json
    import random
    import shlex
    from pathlib import Path

    from forerun.bench.contenders import parse_list
    from forerun.bench.datasets import load_questions
    from forerun.bench.serving import ServeBenchOptions, parse_loads, parse_slos, run_serve_bench, write_outputs

    try:
        import httpx  # noqa: F401
    except ImportError:
        raise ValueError("forerun bench-serve needs httpx: pip install 'forerun[serve]'") from None
    try:
        extra = json.loads(a.extra_body)
    except json.JSONDecodeError as e:
        raise ValueError(f"--extra-body is not JSON: {e}") from None
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    if a.num_prompts < 1 or a.max_tokens < 1 or a.warmup < 0:
        raise ValueError("--num-prompts and --max-tokens must be >= 1, --warmup >= 0")
    questions = load_questions(a.dataset, parse_list(a.categories) or None)
    random.Random(a.seed).shuffle(questions)  # Spec-Bench's file runs category by category
    options = ServeBenchOptions(
        base_url=a.base_url, model=a.model, questions=tuple(questions),
        loads=parse_loads(a.concurrency, a.request_rate), num_prompts=a.num_prompts, max_tokens=a.max_tokens,
        temperature=a.temperature, arrival=a.arrival, slos_ms=parse_slos(a.goodput),
        api_key=key_of(a.api_key, CLIENT_KEY_VARIABLE),
        extra_body=tuple(extra.items()), warmup=a.warmup, seed=a.seed, timeout_s=a.timeout, label=a.label,
        command="forerun " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench-serve"] else shlex.join(sys.argv))
    result = run_serve_bench(options, log=lambda msg: print(msg, file=sys.stderr))
    paths = write_outputs(result, Path(a.out))
    print((Path(a.out) / "report.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0 if all(run["completed"] for run in result["runs"]) else 1

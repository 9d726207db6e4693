"""`forerun serve`: arguments -> EngineConfig, SpecConfig, ServeConfig -> uvicorn. Wired into
forerun/cli.py by add_serve_parser(subparsers).

The speculation flags repeat `forerun generate`'s (forerun/cli.py's _decode_args also holds sampling
flags, which a server takes per request); their values go through the same spec_config()."""
from __future__ import annotations

import argparse
import logging
import sys

EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from forerun.cli import _model_args  # here, not at the top: forerun.cli imports this module

    p = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible HTTP API (completions, chat, models, metrics)",
        description="An OpenAI-compatible server on the batched engine, with exact speculative decoding. "
                    "Requests may override the speculation with a `speculation` object in extra_body.")
    _model_args(p)
    _speculation_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on the API routes")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: --model as given, or SmolLM2-135M-Instruct)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def _speculation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="pld", help="default speculation method: ar, pld, draft, layer-skip, ... "
                                                    "(default: pld)")
    p.add_argument("--draft-model", help="draft model for --method draft (HF directory or .gguf)")
    p.add_argument("--num-draft", type=int, default=None, help="draft tokens per step (fixes the length)")
    p.add_argument("--tree-width", type=int, default=1, help="--method draft: children per tree node")
    p.add_argument("--guard", action="store_true",
                   help="take plain steps while speculation measures slower per token (same output)")
    p.add_argument("--budget", choices=["fixed", "goodput", "cost"], default="fixed",
                   help="goodput: verify of each draft the nodes worth their rows for the whole batch")
    p.add_argument("--exit-layer", type=int, default=None, help="--method layer-skip: layers the drafter runs")
    p.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE",
                   help="a method-specific option (repeatable), e.g. --opt datastore=DS")


def served_name(a: argparse.Namespace) -> str:
    return a.served_model_name or a.model or EMBEDDED_NAME


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"forerun serve needs {e.name}: pip install 'forerun[serve]'") from None

    from forerun.cli import engine_config, spec_config
    from forerun.models.runtime import check_quant
    from forerun.serve.app import ServeConfig, create_app

    spec, limits = spec_config(a), engine_config(a)  # bad flags fail here, before anything loads
    check_quant(a.quant, a.dtype, a.device)
    if not 0 <= a.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {a.port}")
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), format="%(levelname)s:     %(name)s: %(message)s")
    server: uvicorn.Server | None = None

    def load():
        from forerun.engine.engine import Engine
        from forerun.models.runtime import load as load_runtime

        logging.getLogger("forerun.serve").info("loading %s", a.model or f"{EMBEDDED_NAME} (embedded)")
        runtime = load_runtime(a.model, dtype=a.dtype, device=a.device, quant=a.quant)
        if runtime.tokenizer is None:
            raise ValueError("serving needs a model with a tokenizer")
        engine = Engine(runtime, limits)
        engine.drafter(spec)  # a bad draft model or option fails now, not at the first request
        return engine

    def load_failed(reason: str) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(load, ServeConfig(served_name(a), spec, a.api_key), on_load_failure=load_failed)
    server = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level,
                                           timeout_graceful_shutdown=None))
    server.run()
    failed = app.state.worker.failed
    if failed is not None:
        print(f"forerun serve: error: the model failed to load: {failed}", file=sys.stderr)
        return 1
    return 0 if server.started else 1

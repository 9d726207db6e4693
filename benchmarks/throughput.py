"""Aggregate generation throughput at several concurrency levels: forerun vs HF transformers `generate`
on left-padded batches, on the same Spec-Bench prompt ids and the same weights (the embedded
SmolLM2-135M-Instruct unless --model is given).

At concurrency c the prompt list is cut into waves of c prompts. HF generates each wave as one padded
batch; forerun gets the same wave as one call of its batched engine (LLM.generate_batch_ids). forerun
also runs the whole list through its engine with c requests in flight at any time (`@continuous`: a
new request joins as soon as one finishes, as a server's engine runs). A level's aggregate tok/s is
its new tokens (up to and excluding EOS, per sequence) over its wall seconds, both summed over the
level's waves. Prints a markdown report: tok/s per contender and level, HF's fastest dtype, and the
ratios the targets are stated in:

  1. forerun at concurrency 16 vs forerun `ar` at concurrency 1 on the same engine (target >= 2.0x);
  2. forerun at concurrency 16 vs HF's fastest dtype at concurrency 16 (target >= 2.5x);

and how many forerun outputs differ from forerun `ar` at concurrency 1 (greedy: batching must not change
an output, so it must be 0).

    python benchmarks/throughput.py --out throughput-out
    python benchmarks/throughput.py --concurrency 1,4 --prompts 8
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from forerun.bench.contenders import ChatCodec, EngineCache, ForerunContender, forerun_contenders, parse_list
from forerun.bench.datasets import Question, kind_of, load_questions
from forerun.bench.harness import machine_description, versions
from forerun.bench.peers import HFContender, PeerContext, build_peers
from forerun.config import SamplingParams, SpecConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
WARMUP_TOKENS = 16  # as the bench runner's warm-up: builds the wave's kernels and buffers, little else
TARGET_LEVEL, TARGET_VS_AR1, TARGET_VS_HF = 16, 2.0, 2.5

Wave = list[list[int]]  # prompt token ids, one list per sequence


@dataclass(frozen=True, slots=True)
class Prompt:
    question_id: str
    category: str
    ids: tuple[int, ...]  # first turn, chat template applied, forerun's tokenizer


@dataclass(frozen=True, slots=True)
class WaveRun:
    """One contender generating one wave, timed end to end (prefill included)."""

    level: int
    repeat: int
    first: int  # index of the wave's first prompt in the prompt list
    contender: str
    wall_s: float
    outputs: tuple[tuple[int, ...], ...]  # new tokens per prompt, EOS excluded

    @property
    def new_tokens(self) -> int:
        return sum(map(len, self.outputs))


# -- the contenders: a wave of prompt ids in, new token ids per prompt out --------------------------------


class ForerunWaves:
    """forerun's batched engine given one wave at a time."""

    path = "LLM.generate_batch_ids on each wave (the batched engine)"
    continuous = False

    def __init__(self, contender: ForerunContender):
        self.name, self.label, self.llm, self.spec = contender.name, contender.label, contender.llm, contender.spec

    def generate(self, wave: Wave, params: SamplingParams) -> list[list[int]]:
        self.llm.engine.reset_prefix_cache()  # contenders share an engine: every wave starts cold
        return [g.token_ids for g in self.llm.generate_batch_ids(wave, params, self.spec)]


class ForerunContinuous(ForerunWaves):
    """The whole prompt list through the engine, `level` requests in flight: a finished request's place
    goes to the next prompt at once."""

    path = "the engine fed continuously, c requests in flight"
    continuous = True

    def __init__(self, contender: ForerunContender):
        super().__init__(contender)
        self.name = f"{contender.name}@continuous"
        self.level = 1

    def generate(self, wave: Wave, params: SamplingParams) -> list[list[int]]:
        engine, queue, order, done = self.llm.engine, list(enumerate(wave)), {}, {}
        engine.reset_prefix_cache()
        while queue or engine.has_unfinished():
            while queue and len(order) - len(done) < self.level:
                i, prompt = queue.pop(0)
                order[engine.add_request(prompt, params, self.spec)] = i
            for out in engine.step():
                if out.finished:
                    done[order[out.request_id]] = out.generations[0].token_ids
        return [done[i] for i in range(len(wave))]


class HFWaves:
    """transformers `generate` on a left-padded batch with an attention mask: how HF serves several
    prompts at once without a serving engine."""

    path = "model.generate on a left-padded batch"

    def __init__(self, peer: HFContender):
        self.name, self.label, self.model = peer.name, peer.label, peer.hf.model
        self.eos_ids = peer.eos_ids  # sorted
        self.pad_id = self.eos_ids[0]  # the model has no pad token; padded positions are masked anyway

    def generate(self, wave: Wave, params: SamplingParams) -> list[list[int]]:
        from transformers import GenerationConfig

        # Written out in full, greedy, as the bench's HF peer does, so that nothing from the model's
        # generation_config.json changes the output.
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False, temperature=None,
                                  top_k=None, top_p=None, eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        width = max(map(len, wave))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in wave], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in wave], device=self.model.device)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, generation_config=config)
        return [_before_eos(row[width:].tolist(), self.eos_ids) for row in out]


def _before_eos(ids: list[int], eos_ids: list[int]) -> list[int]:
    """A finished row goes on with padding until the whole batch is done; only its tokens before EOS count."""
    return next((ids[:i] for i, t in enumerate(ids) if t in eos_ids), ids)


# -- prompts ----------------------------------------------------------------------------------------------


def spread(questions: list[Question], n: int) -> list[Question]:
    """n questions taken in turn from each Spec-Bench task kind (and within MT-Bench, from each of its
    categories), so that every wave mixes short and long prompts as a server's queue would."""
    by_kind: dict[str, dict[str, list[Question]]] = defaultdict(lambda: defaultdict(list))
    for q in questions:
        by_kind[kind_of(q.category)][q.category].append(q)
    chosen = _round_robin([_round_robin(list(cats.values())) for cats in by_kind.values()])[:n]
    if len(chosen) < n:
        raise SystemExit(f"--prompts {n}: the dataset holds only {len(chosen)} questions")
    return chosen


def _round_robin(groups: list[list]) -> list:
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def encode_prompts(questions: list[Question], codec: ChatCodec) -> list[Prompt]:
    return [Prompt(q.question_id, q.category, tuple(codec.encode([{"role": "user", "content": q.turns[0]}])))
            for q in questions]


# -- measurement -------------------------------------------------------------------------------------------


def measure(contenders: list, prompts: list[Prompt], levels: list[int], repeats: int, params: SamplingParams,
            device: str, failed: dict[str, str], log) -> list[WaveRun]:
    """Every level's waves, contenders interleaved per wave (A B C, A B C, ...) so that drift of a shared
    machine falls on all of them alike. A contender that fails at a level is skipped for the rest of it."""
    warmup = SamplingParams(max_new_tokens=min(WARMUP_TOKENS, params.max_new_tokens))
    runs = []
    for level in levels:
        start = time.perf_counter()
        waves = [(i, [list(p.ids) for p in prompts[i:i + level]]) for i in range(0, len(prompts), level)]
        everything = [(0, [list(p.ids) for p in prompts])]
        for c in contenders:  # untimed: the first wave, so each wave size is measured warm
            c.level = level
            _attempt(c, level, failed, log, c.generate, waves[0][1], warmup)
        for repeat in range(repeats):
            for c in contenders:
                if getattr(c, "continuous", False):  # the whole list at once, `level` in flight
                    run = _attempt(c, level, failed, log, timed, c, everything[0][1], params, device)
                    if run is not None:
                        runs.append(WaveRun(level, repeat, 0, c.name, run[0], tuple(map(tuple, run[1]))))
            for first, wave in waves:
                for c in contenders:
                    if getattr(c, "continuous", False):
                        continue
                    run = _attempt(c, level, failed, log, timed, c, wave, params, device)
                    if run is not None:
                        wall, outputs = run
                        runs.append(WaveRun(level, repeat, first, c.name, wall, tuple(map(tuple, outputs))))
        log(f"concurrency {level}: {len(waves)} waves x {len(contenders)} contenders x {repeats} repeats "
            f"in {time.perf_counter() - start:.0f}s")
    return runs


def timed(contender, wave: Wave, params: SamplingParams, device: str) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outputs = contender.generate(wave, params)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, outputs


def _attempt(contender, level: int, failed: dict[str, str], log, call, *args):
    """call(*args), unless this contender already failed at this level; an error (HF running out of
    memory on a wide padded batch, say) costs it only the rest of this level."""
    key = f"{contender.name} @ {level}"
    if key in failed:
        return None
    try:
        return call(*args)
    except Exception as e:  # noqa: BLE001  (one failing contender must not sink the run)
        failed[key] = f"{type(e).__name__}: {e}"
        log(f"skipping {key}: {failed[key]}")
        return None


# -- summaries ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LevelResult:
    level: int
    contender: str
    tokens_per_s: float  # median over repeats of the level's aggregate tok/s
    per_repeat: tuple[float, ...]
    new_tokens: int  # summed over the level's waves, first repeat
    wall_s: float


def summarize(runs: list[WaveRun], prompts: int) -> dict[tuple[int, str], LevelResult]:
    """(level, contender) -> its result, for levels where every prompt of every repeat was measured."""
    groups: dict[tuple[int, str], dict[int, list[WaveRun]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[r.level, r.contender][r.repeat].append(r)
    out = {}
    for (level, name), by_repeat in groups.items():
        if any(sum(len(r.outputs) for r in rs) != prompts for rs in by_repeat.values()):
            continue
        rates = tuple(sum(r.new_tokens for r in rs) / sum(r.wall_s for r in rs) for _, rs in sorted(by_repeat.items()))
        first = by_repeat[min(by_repeat)]
        out[level, name] = LevelResult(level, name, statistics.median(rates), rates,
                                       sum(r.new_tokens for r in first), sum(r.wall_s for r in first))
    return out


def outputs_of(runs: list[WaveRun]) -> dict[tuple[int, str], dict[int, set[tuple[int, ...]]]]:
    """(level, contender) -> prompt index -> the outputs it gave over the repeats."""
    out: dict = defaultdict(lambda: defaultdict(set))
    for r in runs:
        for i, ids in enumerate(r.outputs):
            out[r.level, r.contender][r.first + i].add(ids)
    return out


def differing(outputs: dict, level: int, name: str, reference: str) -> tuple[int, int] | None:
    """(prompts whose output differs from `reference` at concurrency 1 in any repeat, prompts compared)."""
    ref = outputs.get((1, reference))
    ours = outputs.get((level, name))
    if not ref or not ours:
        return None
    compared = [i for i in ours if i in ref]
    return sum(ours[i] != ref[i] for i in compared), len(compared)


def reference_ar(ours: list[ForerunWaves]) -> dict[str, str]:
    """Each forerun contender -> the `ar` contender (in waves) on the same engine, plain `ar` settings preferred."""
    out = {}
    for c in ours:
        same_engine = [ar for ar in ours if ar.spec.method == "ar" and ar.llm is c.llm and not ar.continuous]
        if same_engine:
            out[c.name] = min(same_engine, key=lambda ar: ar.spec != SpecConfig()).name
    return out


# -- report -------------------------------------------------------------------------------------------------


def report(meta: dict, ours: list[ForerunWaves], hf: list[HFWaves], levels: list[int], results: dict,
           outputs: dict, ar_of: dict[str, str], failed: dict[str, str]) -> tuple[str, dict]:
    """The markdown report, and the ratios and output checks for results.json."""
    def rate(level, name):
        r = results.get((level, name))
        return None if r is None else r.tokens_per_s

    hf_best = {level: max(((rate(level, h.name), h.name) for h in hf if rate(level, h.name)), default=(None, None))
               for level in levels}
    lines = [f"# forerun throughput vs HF transformers, by concurrency ({meta['date'][:10]})", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}", f"- versions: {meta['versions']}",
             f"- {meta['prompts']} Spec-Bench prompts (first turns; {meta['categories']}), chat template, the same "
             f"token ids for every engine; greedy, {meta['max_new_tokens']} new tokens, EOS respected (tokens "
             "after a sequence's EOS are not counted)",
             "- at concurrency c the prompts go in waves of c; aggregate tok/s = new tokens / wall seconds over "
             f"all waves of the level (prefill included), median of {meta['repeats']} repeat(s); contenders "
             "interleaved per wave; one untimed warm-up wave per level and contender"]
    lines += [f"- `{c.name}`: {c.label.engine}, {c.label.dtype}; {c.path}" for c in (*ours, *hf)]
    lines += [f"- failed `{k}`: {v}" for k, v in failed.items()]

    names = [c.name for c in (*ours, *hf)]
    head = "| concurrency | " + " | ".join(f"`{n}` tok/s" for n in names) + " | HF fastest |"
    lines += ["", head, "|" + "---|" * (len(names) + 2)]
    for level in levels:
        best, best_name = hf_best[level]
        lines.append(f"| {level} | " + " | ".join(_num(rate(level, n)) for n in names) +
                     f" | {_num(best)}{f' (`{best_name}`)' if best_name else ''} |")

    ratios = []
    lines += ["", "| concurrency | forerun | tok/s | vs HF fastest | vs forerun ar @ c=1 | outputs differing "
              "from ar @ c=1 |", "|---|---|---|---|---|---|"]
    for level in levels:
        for c in ours:
            ar = ar_of.get(c.name)
            row = {"level": level, "contender": c.name, "tokens_per_s": rate(level, c.name),
                   "hf_fastest": hf_best[level][1], "vs_hf_fastest": _ratio(rate(level, c.name), hf_best[level][0]),
                   "reference_ar": ar, "vs_ar_at_1": _ratio(rate(level, c.name), rate(1, ar)),
                   "differ_from_ar_at_1": differing(outputs, level, c.name, ar) if ar else None}
            ratios.append(row)
            lines.append(f"| {level} | `{c.name}` | {_num(row['tokens_per_s'])} | {_x(row['vs_hf_fastest'])} | "
                         f"{_x(row['vs_ar_at_1'])} | {_fraction(row['differ_from_ar_at_1'])} |")

    hf_padding = {f"{h.name} @ {level}": differing(outputs, level, h.name, h.name) for h in hf for level in levels}
    if hf and 1 in levels:
        lines += ["", "HF outputs that differ from its own output at concurrency 1 (padding and batch shapes "
                  "change its arithmetic; for information):", "",
                  "| concurrency | " + " | ".join(f"`{h.name}`" for h in hf) + " |", "|" + "---|" * (len(hf) + 1)]
        lines += [f"| {level} | " + " | ".join(_fraction(hf_padding[f'{h.name} @ {level}']) for h in hf) + " |"
                  for level in levels if level != 1]

    lines += ["", f"Targets at concurrency {TARGET_LEVEL}:"]
    at_target = [r for r in ratios if r["level"] == TARGET_LEVEL]
    if not at_target:
        lines.append(f"- not measured: add {TARGET_LEVEL} to --concurrency")
    for r in at_target:
        lines.append(f"- `{r['contender']}`: {_x(r['vs_ar_at_1'])} forerun ar @ c=1 (target >= {TARGET_VS_AR1}x: "
                     f"{_met(r['vs_ar_at_1'], TARGET_VS_AR1)}), {_x(r['vs_hf_fastest'])} HF fastest "
                     f"(target >= {TARGET_VS_HF}x: {_met(r['vs_hf_fastest'], TARGET_VS_HF)}), outputs differing "
                     f"from ar @ c=1: {_fraction(r['differ_from_ar_at_1'])} (must be 0)")
    return "\n".join(lines), {"forerun": ratios, "hf_differ_from_own_c1": hf_padding}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _fraction(v: tuple[int, int] | None) -> str:
    return "-" if v is None else f"{v[0]}/{v[1]}"


def _met(v: float | None, target: float) -> str:
    return "-" if v is None else ("met" if v >= target else "not met")


# -- main ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = sorted(set(_positive_ints(args.concurrency, "--concurrency")))
    engines = EngineCache(args.model, args.device)
    contenders = forerun_contenders(parse_list(args.forerun), engines)
    ours = [ForerunWaves(c) for c in contenders]
    if not args.no_continuous:
        ours += [ForerunContinuous(c) for c in contenders]
    codec = ChatCodec(ours[0].llm)
    questions = spread(load_questions(args.dataset, parse_list(args.categories) or None), args.prompts)
    prompts = encode_prompts(questions, codec)
    ctx = PeerContext(model=args.model, device=args.device, default_dtype="float32", eos_ids=codec.eos_ids)
    peers, skipped = build_peers([f"hf:{d}" for d in parse_list(args.hf_dtypes)], ctx, log=_log)
    hf = [HFWaves(p) for p in peers]
    failed = {k: f"not loaded: {v}" for k, v in skipped.items()}
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    _log(f"{len(prompts)} prompts ({min(len(p.ids) for p in prompts)}-{max(len(p.ids) for p in prompts)} tokens), "
         f"concurrency {levels}; contenders: " + ", ".join(c.name for c in (*ours, *hf)))

    runs = measure([*ours, *hf], prompts, levels, args.repeats, params, args.device, failed, _log)
    results = summarize(runs, len(prompts))
    outputs = outputs_of(runs)
    meta = _meta(args, prompts, levels)
    text, ratios = report(meta, ours, hf, levels, results, outputs, reference_ar(ours), failed)
    print(text)
    if args.out:
        write(Path(args.out), text, {
            "meta": meta, "contenders": {c.name: {**c.label.to_dict(), "path": c.path} for c in (*ours, *hf)},
            "failed": failed, "levels": [asdict(r) for r in results.values()], "ratios": ratios,
            "prompts": [{"question_id": p.question_id, "category": p.category, "prompt_tokens": len(p.ids)}
                        for p in prompts],
            "waves": [{**asdict(r), "new_tokens": r.new_tokens} for r in runs]}, _log)
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(DEFAULT_DATASET), help="Spec-Bench-format JSONL (default: %(default)s)")
    p.add_argument("--categories", help="only these categories, comma-separated (default: all, spread evenly)")
    p.add_argument("--prompts", type=int, default=64, help="prompts, the same list at every level (default: 64)")
    p.add_argument("--concurrency", default="1,4,16,64", help="wave sizes, comma-separated (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="timed passes per level; the median is reported")
    p.add_argument("--forerun", default="ar:quant=q4",
                   help="forerun contenders method[:dtype][:key=value...], comma-separated (default: %(default)s)")
    p.add_argument("--hf-dtypes", default="float32,bfloat16",
                   help="HF weight dtypes, each measured; the fastest per level is the reference "
                        "(default: %(default)s)")
    p.add_argument("--model", help="HF directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-continuous", action="store_true",
                   help="measure forerun in waves only, not also fed continuously")
    p.add_argument("--out", help="directory for results.json and report.md (default: print only)")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.repeats < 1 or args.max_new_tokens < 1:
        p.error("--prompts, --repeats and --max-new-tokens must be >= 1")
    return args


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in parse_list(text)]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{flag}: expected integers >= 1, got {text!r}")
    return values


def _meta(args: argparse.Namespace, prompts: list[Prompt], levels: list[int]) -> dict:
    counts = defaultdict(int)
    for p in prompts:
        counts[p.category] += 1
    return {"command": shlex.join(["python", "benchmarks/throughput.py", *sys.argv[1:]]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_description(args.device), "versions": versions(), "dataset": args.dataset,
            "prompts": len(prompts), "categories": ", ".join(f"{c} {n}" for c, n in counts.items()),
            "concurrency": levels, "repeats": args.repeats, "max_new_tokens": args.max_new_tokens,
            "sampling": "greedy", "warmup_tokens": WARMUP_TOKENS}


def write(out: Path, text: str, data: dict, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {out / 'report.md'}, {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())

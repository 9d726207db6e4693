"""Self-distillation data for a draft head: the target's own replies to training prompts, then the
target's features over each prompt and reply.

A head learns best from the features it will see at inference, so both stages run the target as it
serves (the embedded model in q4 on the CPU): replies come from the batched engine, greedy and sampled,
and the features from a teacher-forced forward of the same runtime over prompt + reply.

Prompts come from training sets only, never from data used to measure: the instruction mix
(../shared/data/train_prompts/self_instruct_mix.jsonl), GSM8K train, questions the target writes itself
(generated_prompts: it is given its chat template up to where a user's message begins, as Magpie does,
arXiv 2406.08464, so the questions read like what users ask a chat model), and code tasks over
functions of Python's own standard library (code_prompts). Both stages append to files and skip what is already there, so a stopped
run resumes where it stopped.
"""
from __future__ import annotations

import ast
import json
import random
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from forerun.config import SamplingParams, SpecConfig
from forerun.drafters.base import Drafter, root_only
from forerun.types import Draft, Scores, Verdict

MAX_PROMPT_TOKENS = 640  # longer prompts are skipped: their features cost more than their replies teach


@dataclass(frozen=True, slots=True)
class PromptSpec:
    """Which training prompts to draw: how many from each file, and the seed of the draw."""

    instruct: str = "../shared/data/train_prompts/self_instruct_mix.jsonl"
    gsm8k: str = "../shared/data/gsm8k/train.jsonl"
    instruct_count: int = 1500
    gsm8k_count: int = 500
    generated_count: int = 0  # questions the target writes itself (generated_prompts)
    code_count: int = 0  # code tasks over standard-library functions (code_prompts)
    seed: int = 0


def training_prompts(spec: PromptSpec, generated: list[dict] = ()) -> list[dict]:
    """[{"id", "source", "text"}]: the instruction mix drawn evenly across its templates (T0's 11k
    prompts come from a few hundred templates; drawing per template keeps the mix varied), GSM8K
    train questions, code tasks, and `generated` (from generated_prompts), shuffled together.
    Deterministic for a seed."""
    rng = random.Random(spec.seed)
    by_source: dict[str, list[dict]] = {}
    for i, line in enumerate(Path(spec.instruct).read_text().splitlines()):
        row = json.loads(line)
        by_source.setdefault(row["source"], []).append({"id": f"instruct-{i}", "source": row["source"],
                                                        "text": row["prompt"]})
    for rows in by_source.values():
        rng.shuffle(rows)
    picked: list[dict] = []
    sources = sorted(by_source)
    while len(picked) < spec.instruct_count and any(by_source.values()):
        for source in sources:  # one from each template per round
            if by_source[source] and len(picked) < spec.instruct_count:
                picked.append(by_source[source].pop())
    questions = [json.loads(line) for line in Path(spec.gsm8k).read_text().splitlines()]
    order = rng.sample(range(len(questions)), min(spec.gsm8k_count, len(questions)))
    picked += [{"id": f"gsm8k-{i}", "source": "gsm8k", "text": questions[i]["question"]} for i in order]
    picked += code_prompts(spec.code_count, spec.seed)
    picked += list(generated)[:spec.generated_count]
    rng.shuffle(picked)
    return picked


_CODE_TASKS = (
    "Explain what this Python function does, step by step:\n\n```python\n{source}\n```",
    "Write a Python function `{name}{signature}` that does the following: {summary}",
    "Rewrite this Python function so it is easier to read, and explain your changes:\n\n```python\n{source}\n```",
    "Write unit tests for this Python function:\n\n```python\n{source}\n```",
    "What does `{name}{signature}` return? Here is its code:\n\n```python\n{source}\n```",
)


def code_prompts(count: int, seed: int = 0) -> list[dict]:
    """`count` code tasks (explain, write, rewrite, test) over documented functions of 5-40 lines in
    the running Python's standard library: code the machine has offline, under a licence that allows it.
    Deterministic for a seed and a Python version."""
    if count <= 0:
        return []
    functions = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            text = path.read_text()
            tree = ast.parse(text)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if not doc or not 5 <= length <= 40:
                continue
            source = "\n".join(lines[node.lineno - 1:node.end_lineno])
            indent = len(source) - len(source.lstrip())
            source = "\n".join(line[indent:] for line in source.splitlines())
            functions.append({"name": node.name, "signature": f"({ast.unparse(node.args)})",
                              "summary": doc.strip().splitlines()[0], "source": source, "file": path.name})
    rng = random.Random(seed)
    rng.shuffle(functions)
    return [{"id": f"code-{f['file']}-{f['name']}-{i % len(_CODE_TASKS)}", "source": "code",
             "text": _CODE_TASKS[i % len(_CODE_TASKS)].format(**f)} for i, f in enumerate(functions[:count])]


def generated_prompts(llm, count: int, out: Path | None = None, seed: int = 0, batch: int = 96,
                      max_new_tokens: int = 80) -> list[dict]:
    """`count` questions the target writes itself: its chat template up to where a user's message
    begins (Magpie's pre-query template), continued at T = 1 until the message ends. Questions cut off
    by the length cap, shorter than 12 characters, or repeated are dropped. Saved to `out` (JSON lines)
    and read back from there when it holds enough, so a resumed run asks the same questions."""
    if count <= 0:
        return []
    if out is not None and out.is_file():
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        if len(rows) >= count:
            return rows[:count]
    tok = llm.tokenizer
    if tok.chat_template is None:
        raise ValueError("generated prompts need a model with a chat template")
    marker = "\u2063QUESTION\u2063"
    rendered = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=False)
    prefix = tok.encode(rendered[:rendered.index(marker)], add_bos=False)
    if not prefix:
        raise ValueError("generated prompts need a chat template that marks where a user's message begins")
    batch = min(batch, llm.engine.config.max_num_seqs)
    rows, seen, round_ = [], set(), 0
    while len(rows) < count:
        params = SamplingParams(temperature=1.0, top_p=0.98, max_new_tokens=max_new_tokens, n=batch,
                                seed=seed * 100_003 + round_)
        for sample in llm.generate_batch_ids([prefix], params)[0].samples:
            text = sample.text.strip()
            key = " ".join(text.lower().split())
            if sample.finish_reason == "length" or len(text) < 12 or key in seen:
                continue
            seen.add(key)
            rows.append({"id": f"generated-{len(rows)}", "source": "generated", "text": text})
        round_ += 1
        if round_ > 4 * count // batch + 8:
            break  # the model repeats itself: take what there is
    rows = rows[:count]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


class Recorder(Drafter):
    """Drafts nothing (every step is one plain token, as `ar`) and keeps what the target computed on the
    way: at every position, the residual streams after `layers` layers (the head's input features) and,
    from the last prompt token on, the final-normed hidden state (whose logits are the training targets)
    and the target's most likely token there.
    Recording during generation costs no extra forward: the engine's own prefill and decoding rows
    carry them (Drafter.prefill_layers and layers_wanted)."""

    def __init__(self, target, layers: tuple[int, ...]):
        super().__init__(target, SpecConfig(method="ar"))
        self.prefill_layers = tuple(layers)
        self.finished: list[dict] = []

    def begin(self, seq) -> dict:
        capacity = len(seq.tokens) + seq.params.max_new_tokens + 1
        width = self.target.model.args.hidden_size
        return {"feats": torch.zeros(capacity, len(self.prefill_layers) * width, dtype=torch.float16),
                "hidden": torch.zeros(capacity, width, dtype=torch.float16),
                "argmax": torch.zeros(capacity, dtype=torch.int32), "seen": 0}

    def propose(self, seq, depth: int) -> Draft:
        return root_only(seq)

    def layers_wanted(self, seq) -> tuple[int, ...]:
        return self.prefill_layers

    def observe_prefill(self, seq, start: int, layers: dict[int, torch.Tensor]) -> None:
        state = seq.draft_state
        feats = torch.cat([layers[k] for k in self.prefill_layers], dim=-1)
        state["feats"][start:start + feats.shape[0]] = feats.to(torch.float16)
        state["seen"] = start + feats.shape[0]

    def observe(self, seq, draft: Draft, verdict: Verdict, scores: Scores) -> None:
        state = seq.draft_state
        root = len(seq.tokens) - verdict.accepted - 2  # the root's position (seq holds the new tokens)
        path = torch.tensor(verdict.path)
        rows = torch.arange(root, root + len(path))
        state["feats"][rows] = torch.cat([scores.layers[k][path] for k in self.prefill_layers], -1).to(torch.float16)
        state["hidden"][rows] = scores.hidden[path].to(torch.float16)
        state["argmax"][rows] = scores.logits[path].argmax(-1).to(torch.int32)
        state["seen"] = root + len(path)

    def end(self, seq) -> None:
        state, first = seq.draft_state, seq.prompt_len - 1
        n = state["seen"]  # positions whose features were computed: every token but the last
        self.finished.append({"request_id": seq.request_id, "prompt_len": seq.prompt_len,
                              "tokens": torch.tensor(seq.tokens[:n + 1], dtype=torch.int32),
                              "feats": state["feats"][:n].clone(), "hidden": state["hidden"][first:n].clone(),
                              "argmax": state["argmax"][first:n].clone()})


def record(llm, prompts: list[dict], out: Path, layers: tuple[int, ...], temperatures: tuple[float, ...] = (0.0, 0.7),
           max_new_tokens: int = 256, in_flight: int = 48, shard_size: int = 64, seed: int = 0,
           progress=None) -> None:
    """Answer every prompt with the target (prompt i at temperatures[i % len(temperatures)], so each
    temperature sees a share of every source), recording the features each reply was decoded with,
    into shard files under `out` of `shard_size` replies (prompts already in a shard are skipped on
    resume). `in_flight` requests decode together, a new one joining as each finishes, so the batch
    never drains. The engine must not skip prompt rows through its prefix cache."""
    if llm.engine.config.prefix_caching:
        raise ValueError("recording needs an engine without prefix caching (EngineConfig(prefix_caching=False))")
    out.mkdir(parents=True, exist_ok=True)
    done = {row["id"] for shard in sorted(out.glob("shard-*.pt")) for row in torch.load(shard)["meta"]}
    todo = []
    for i, prompt in enumerate(prompts):
        if prompt["id"] in done:
            continue
        ids = prompt["ids"] if "ids" in prompt else llm.encode(prompt["text"])
        if len(ids) <= MAX_PROMPT_TOKENS:
            temperature = temperatures[i % len(temperatures)]
            params = SamplingParams(temperature=temperature, top_p=0.95 if temperature else 1.0,
                                    max_new_tokens=max_new_tokens, seed=seed + i)
            todo.append(({"id": prompt["id"], "source": prompt["source"], "temperature": temperature}, ids, params))
    engine = llm.engine
    recorder = Recorder(llm.runtime, layers)
    spec = SpecConfig(method="ar")
    engine.use_drafter(spec, recorder)
    shard = len(list(out.glob("shard-*.pt")))
    meta_of, pending, queue = {}, [], list(reversed(todo))
    t0, tokens = time.perf_counter(), 0
    while queue or engine.has_unfinished() or pending:
        while queue and len(engine.requests) < in_flight:
            meta, ids, params = queue.pop()
            meta_of[engine.add_request(ids, params, spec)] = meta
        if engine.has_unfinished():
            engine.step()
        for rec in recorder.finished:
            rec["meta"] = meta_of.pop(rec.pop("request_id"))
            tokens += len(rec["tokens"]) - rec["prompt_len"]
            pending.append(rec)
        recorder.finished.clear()
        if len(pending) >= shard_size or (pending and not queue and not engine.has_unfinished()):
            batch, pending = pending[:shard_size], pending[shard_size:]
            path = out / f"shard-{shard:04d}.pt"
            torch.save({"meta": [r.pop("meta") for r in batch], "records": batch, "layers": list(layers)},
                       path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
            shard += 1
            if progress is not None:
                progress(len(batch), tokens, time.perf_counter() - t0)
            t0, tokens = time.perf_counter(), 0


def load_shards(folder: Path) -> tuple[list[dict], list[dict]]:
    """Every recorded reply (meta, record) in shard order."""
    meta, records = [], []
    for shard in sorted(folder.glob("shard-*.pt")):
        data = torch.load(shard)
        meta += data["meta"]
        records += data["records"]
    return meta, records

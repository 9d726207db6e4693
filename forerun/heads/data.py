"""Self-distillation data for a draft head: the target's own replies to training prompts, then the
target's features over each prompt and reply.

A head learns best from the features it will see at inference, so both stages run the target as it
serves (the embedded model in q4 on the CPU): replies come from the batched engine, greedy and sampled,
and the features from a teacher-forced forward of the same runtime over prompt + reply.

Prompts come from training sets only (../shared/data/train_prompts/self_instruct_mix.jsonl, GSM8K train),
never from data used to measure. Both stages append to files and skip what is already there, so a stopped
run resumes where it stopped.
"""
from __future__ import annotations

import json
import random
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
    seed: int = 0


def training_prompts(spec: PromptSpec) -> list[dict]:
    """[{"id", "source", "text"}]: the instruction mix drawn evenly across its templates (T0's 11k
    prompts come from a few hundred templates; drawing per template keeps the mix varied), then GSM8K
    train questions. Deterministic for a seed."""
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
    rng.shuffle(picked)
    return picked


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

"""Run contenders over questions, interleaved per prompt (A B C, A B C, ...) so that machine drift
falls on every contender alike, and keep one record per (question, turn, contender).

Each contender answers multi-turn questions in its own conversation: its earlier answers are part of
its next prompt, as in Spec-Bench. Every call is timed here, end to end (prefill included), the same
way for forerun and the peers.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field

from forerun.bench.contenders import Codec, Contender, Messages
from forerun.bench.datasets import Question
from forerun.bench.memory import PeakMemory
from forerun.config import SamplingParams


@dataclass(slots=True)
class Record:
    question_id: str
    category: str
    turn: int  # 0-based
    contender: str
    prompt_tokens: int
    new_tokens: int
    wall_s: float  # end to end: prefill and decoding
    token_ids: list[int]
    text: str
    target_forwards: int | None = None
    draft_s: float | None = None
    verify_s: float | None = None
    accept_histogram: dict[int, int] | None = None
    peak_mem_mb: float | None = None
    extra_mem_mb: float | None = None  # peak minus memory in use when the call began

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def key(self) -> tuple[str, int]:
        return self.question_id, self.turn

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tokens_per_s"] = round(self.tokens_per_s, 3)
        if self.accept_histogram is not None:
            d["accept_histogram"] = {str(k): v for k, v in sorted(self.accept_histogram.items())}
        return d


@dataclass(frozen=True, slots=True)
class RunConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    device: str = "cpu"
    warmup_tokens: int = 16  # each contender's untimed first generation

    def params(self, max_new_tokens: int | None = None) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, seed=self.seed,
                              max_new_tokens=max_new_tokens or self.max_new_tokens)


@dataclass
class Conversations:
    """Each contender's own chat history for the question being answered."""

    history: dict[str, Messages] = field(default_factory=dict)

    def prompt(self, contender: str, user: str) -> Messages:
        return [*self.history.get(contender, []), {"role": "user", "content": user}]

    def answered(self, contender: str, prompt: Messages, answer: str) -> None:
        self.history[contender] = [*prompt, {"role": "assistant", "content": answer}]


@dataclass
class RunOutcome:
    records: list[Record]
    dropped: dict[str, str]  # contender -> the error that stopped it; its records are left out


def run(contenders: list[Contender], questions: list[Question], codec: Codec, config: RunConfig,
        progress: bool = True, log=print) -> RunOutcome:
    """A contender that raises is dropped (with the error) and the run goes on without it."""
    dropped: dict[str, str] = {}
    warm_up(contenders, questions, codec, config, dropped, log)
    total = sum(len(q.turns) for q in questions) * len(contenders)
    bar = _progress(total, progress)
    records = []
    for q in questions:
        chats = Conversations()
        for turn, user in enumerate(q.turns):
            for c in contenders:
                bar.update()
                if c.name in dropped:
                    continue
                bar.set_postfix_str(f"{q.category} #{q.question_id} turn {turn + 1}: {c.name}", refresh=False)
                prompt = chats.prompt(c.name, user)
                try:
                    record = generate_one(c, codec, codec.encode(prompt), config, q, turn)
                except Exception as e:  # noqa: BLE001  (a broken contender must not sink the others)
                    _drop(c.name, f"question {q.question_id} turn {turn + 1}", e, dropped, log)
                    continue
                chats.answered(c.name, prompt, record.text)
                records.append(record)
    bar.close()
    return RunOutcome([r for r in records if r.contender not in dropped], dropped)


def _drop(name: str, where: str, error: Exception, dropped: dict[str, str], log) -> None:
    dropped[name] = f"failed on {where}: {type(error).__name__}: {error}"
    log(f"dropping {name}: {dropped[name]}")


def generate_one(contender: Contender, codec: Codec, prompt_ids: list[int], config: RunConfig,
                 question: Question, turn: int) -> Record:
    """One timed, memory-measured generation."""
    with PeakMemory(config.device) as memory:
        start = time.perf_counter()
        out = contender.generate(prompt_ids, config.params())
        _synchronize(config.device)
        wall = time.perf_counter() - start
    m = memory.reading
    return Record(question_id=question.question_id, category=question.category, turn=turn,
                  contender=contender.name, prompt_tokens=len(prompt_ids), new_tokens=len(out.token_ids),
                  wall_s=wall, token_ids=list(out.token_ids), text=codec.decode(out.token_ids),
                  target_forwards=out.target_forwards, draft_s=out.draft_s, verify_s=out.verify_s,
                  accept_histogram=out.accept_histogram, peak_mem_mb=round(m.peak_mb, 1),
                  extra_mem_mb=round(m.extra_mb, 1))


def warm_up(contenders: list[Contender], questions: list[Question], codec: Codec, config: RunConfig,
            dropped: dict[str, str], log=print) -> None:
    """One untimed generation per contender on the first question: loads lazy kernels and caches."""
    if not questions:
        return
    prompt_ids = codec.encode([{"role": "user", "content": questions[0].turns[0]}])
    params = config.params(min(config.warmup_tokens, config.max_new_tokens))
    for c in contenders:
        try:
            c.generate(prompt_ids, params)
        except Exception as e:  # noqa: BLE001
            _drop(c.name, "warm-up", e, dropped, log)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="bench", unit="gen", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)

"""Records a strategy passes around: the question it answers, the branches (partial or complete
solutions) it grows, and the account of what answering cost."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields


@dataclass(frozen=True, slots=True)
class Query:
    """One question as the generator sees it: its text and its prompt's token ids (chat template applied)."""

    question: str
    prompt_ids: tuple[int, ...]
    problem_id: str = ""  # the problem it answers (forerun scale's); "" for a question on its own

    @property
    def key(self) -> int:
        """A stable number for the problem (its id, else the question's text): random streams derive from
        it, so a problem's samples do not depend on which problems were answered before it (or in which
        process), and two problems that ask the same question draw their own."""
        return int.from_bytes(hashlib.sha256((self.problem_id or self.question).encode()).digest()[:8], "little")


@dataclass(frozen=True, slots=True)
class Branch:
    """A solution after the prompt, partial (it stopped at a step delimiter) or finished (EOS or
    the token limit). Extending it resubmits prompt + token_ids, so its KV comes from the prefix cache."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    finished: bool = False
    steps: int = 0  # step delimiters reached, plus one once finished
    logprobs: tuple[float, ...] | None = None  # per token of token_ids, when the generator was asked for them


ROOT = Branch()


@dataclass(slots=True)
class Account:
    """What answering cost, taken from the engine's per-sample Stats: prompt tokens of forked samples
    and prefix-cached blocks were not computed, so they are not counted in prefill_tokens."""

    generated_tokens: int = 0  # tokens sampled by the engine
    prefill_tokens: int = 0  # prompt tokens whose K/V were computed (generation and scoring)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache or shared by a fork
    target_forwards: int = 0  # per-sample verification forwards, summed over samples
    engine_steps: int = 0  # batched forwards the engine ran (many samples share one)
    requests: int = 0  # engine requests submitted (one per branch extended, n samples each)
    score_forwards: int = 0  # forwards run for scorers (LLM.score), outside the engine's steps
    scored_tokens: int = 0  # continuation tokens those forwards scored (their prompts are not in prefill_tokens)
    replayed: int = 0  # samples kept from an identical earlier request (counted above, not decoded again)
    wall_s: float = 0.0

    def count(self, stats) -> None:
        """Add one engine sample's Stats (forerun.types.Stats)."""
        self.generated_tokens += stats.new_tokens
        self.prefill_tokens += stats.prefill_tokens
        self.cached_tokens += stats.cached_tokens
        self.target_forwards += stats.target_forwards

    def add(self, other: "Account") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def minus(self, before: "Account") -> "Account":
        return Account(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    def copy(self) -> "Account":
        return Account(**{f.name: getattr(self, f.name) for f in fields(self)})

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["wall_s"] = round(self.wall_s, 4)
        return out


@dataclass(frozen=True, slots=True)
class Candidate:
    """A finished solution a strategy considered, with its extracted answer and score (if scored)."""

    text: str
    answer: str | None
    score: float | None = None
    tokens: int = 0


@dataclass(slots=True)
class Outcome:
    """A strategy's answer to one question."""

    chosen: Candidate | None  # None: no finished solution within the budget
    candidates: list[Candidate] = field(default_factory=list)
    account: Account = field(default_factory=Account)
    notes: dict = field(default_factory=dict)  # strategy-specific facts (rounds, stopped early, pruned)

    @property
    def answer(self) -> str | None:
        return self.chosen.answer if self.chosen else None

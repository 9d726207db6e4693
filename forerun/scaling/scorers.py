"""Scorers: how good a (partial) solution looks, as a log-probability-like value (higher is better).

    ptrue       the model's own P(True): "Is the proposed answer correct? (A) True (B) False", read as
                p(A) / (p(A) + p(B)) from LLM.score on the answer-choice token (Kadavath et al. 2022)
    mean-logprob / sum-logprob
                the branch's token log-probabilities under the model (from generation, or LLM.score)
    reverse     time-reversed likelihood log p(question | answer) with the same model
    reward      a Hugging Face sequence-classification reward model from a local directory

Every scorer returns log values, so exp(score) is a non-negative weight (weighted best-of-n, particles).
"""
from __future__ import annotations

import math
from typing import Protocol

from forerun.scaling.model import ModelScore
from forerun.scaling.types import Branch, Query

PTRUE_QUESTION = ("Question: {question}\n\nProposed answer: {answer}\n\n"
                  "Is the proposed answer correct?\n(A) True\n(B) False")
PTRUE_REPLY = "The proposed answer is: ("
REVERSE_PROMPT = "Answer: {answer}\n\nThe question this answers:"


class Scorer(Protocol):
    name: str
    needs_logprobs: bool  # the generator must record each sampled token's log-probability

    def score(self, query: Query, branches: list[Branch]) -> list[float]:
        ...


class PTrue:
    name, needs_logprobs = "ptrue", False

    def __init__(self, model: ModelScore):
        self.model = model
        self.true_ids, self.false_ids = model.encode("A"), model.encode("B")

    def score(self, query: Query, branches: list[Branch]) -> list[float]:
        return [self.log_p_true(query.question, b.text) for b in branches]

    def log_p_true(self, question: str, answer: str) -> float:
        prompt = self.model.prompt(PTRUE_QUESTION.format(question=question, answer=answer.strip()))
        prompt += self.model.encode(PTRUE_REPLY)
        log_a = sum(self.model(prompt, self.true_ids))
        log_b = sum(self.model(prompt, self.false_ids))
        return log_a - _logaddexp(log_a, log_b)


class TokenLogprob:
    """Mean (default) or sum of the branch's token log-probabilities."""

    needs_logprobs = True

    def __init__(self, model: ModelScore | None = None, mean: bool = True):
        self.model, self.mean = model, mean
        self.name = "mean-logprob" if mean else "sum-logprob"

    def score(self, query: Query, branches: list[Branch]) -> list[float]:
        return [self._one(query, b) for b in branches]

    def _one(self, query: Query, b: Branch) -> float:
        values = b.logprobs
        if values is None:
            if self.model is None:
                raise ValueError(f"{self.name}: the branch has no log-probabilities and no model to score it")
            values = self.model(list(query.prompt_ids), list(b.token_ids)) if b.token_ids else []
        if not values:
            return 0.0
        return sum(values) / len(values) if self.mean else sum(values)


class ReverseLikelihood:
    """log p(question | answer): an answer that explains its question well ranks high."""

    name, needs_logprobs = "reverse", False

    def __init__(self, model: ModelScore):
        self.model = model

    def score(self, query: Query, branches: list[Branch]) -> list[float]:
        question = self.model.encode(" " + query.question.strip())
        return [sum(self.model(self.model.prompt(REVERSE_PROMPT.format(answer=b.text.strip())), question))
                for b in branches]


class RewardModel:
    """A sequence-classification model (question, answer) -> reward. One label: log sigmoid(logit);
    several: the log-probability of the last label (the 'good' class by convention)."""

    name, needs_logprobs = "reward", False

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 8):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch, self.device, self.batch_size = torch, device, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval().to(device)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def score(self, query: Query, branches: list[Branch]) -> list[float]:
        out = []
        for i in range(0, len(branches), self.batch_size):
            chunk = branches[i:i + self.batch_size]
            batch = self.tokenizer([query.question] * len(chunk), [b.text for b in chunk], padding=True,
                                   truncation=True, return_tensors="pt").to(self.device)
            with self.torch.inference_mode():
                logits = self.model(**batch).logits.float()
            if logits.shape[-1] == 1:
                out += self.torch.nn.functional.logsigmoid(logits[:, 0]).tolist()
            else:
                out += logits.log_softmax(-1)[:, -1].tolist()
        return out


def _logaddexp(a: float, b: float) -> float:
    top = max(a, b)
    return top + math.log(math.exp(a - top) + math.exp(b - top))


def _model(name: str, model: ModelScore | None) -> ModelScore:
    if model is None:
        raise ValueError(f"the {name} scorer needs the model")
    return model


def _reward(path: str | None) -> RewardModel:
    if not path:
        raise ValueError("the reward scorer needs a local model directory (--reward-model DIR)")
    return RewardModel(path)


_BUILDERS = {
    "ptrue": lambda model, path: PTrue(_model("ptrue", model)),
    "mean-logprob": lambda model, path: TokenLogprob(model, mean=True),
    "sum-logprob": lambda model, path: TokenLogprob(model, mean=False),
    "reverse": lambda model, path: ReverseLikelihood(_model("reverse", model)),
    "reward": lambda model, path: _reward(path),
}
SCORERS = tuple(_BUILDERS)


def build_scorer(name: str, model: ModelScore | None, reward_model: str | None = None) -> Scorer:
    """A scorer by name; `model` scores with the generating LLM, `reward_model` is a local directory."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")
    return _BUILDERS[name](model, reward_model)

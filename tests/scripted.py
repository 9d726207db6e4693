"""A scripted Generator and Scorer for the scaling tests: continuations and scores are given by
hand, so strategies can be checked against hand-computed results. One token per character."""
from __future__ import annotations

from collections import defaultdict

from forerun.scaling.types import Account, Branch, Query


class ScriptedGenerator:
    """script: branch text -> the continuations to hand out for it, in order (each may be handed
    out once). A continuation ending in the requested stop string is a step; others finish."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.used: dict[str, int] = defaultdict(int)
        self.account = Account()
        self.calls: list[list[tuple[str, int, str | None]]] = []  # per call: (branch text, n, stop)

    def query(self, question: str, problem_id: str = "") -> Query:
        return Query(question, tuple(ord(c) for c in question), problem_id)

    def extend(self, query, requests, stop, max_new_tokens=None):
        self.calls.append([(b.text, n, stop) for b, n in requests])
        out = []
        for branch, n in requests:
            start = self.used[branch.text]
            steps = self.script[branch.text][start:start + n]
            if len(steps) < n:
                raise AssertionError(f"the script has too few continuations of {branch.text!r}")
            self.used[branch.text] += n
            self.account.requests += 1
            self.account.prefill_tokens += len(query.prompt_ids) + len(branch.token_ids)
            out.append([self._grow(branch, s, stop) for s in steps])
        return out

    def _grow(self, branch: Branch, step: str, stop: str | None) -> Branch:
        self.account.generated_tokens += len(step)
        finished = not (stop and step.endswith(stop))
        return Branch(branch.token_ids + tuple(ord(c) for c in step), branch.text + step, finished, branch.steps + 1)


class ScriptedScorer:
    name, needs_logprobs = "scripted", False

    def __init__(self, scores: dict[str, float]):
        self.scores = scores
        self.seen: list[str] = []

    def score(self, query, branches):
        self.seen += [b.text for b in branches]
        return [self.scores[b.text] for b in branches]


def tiny_llm():
    """A tiny random Llama with the stub tokenizer (ids written as numbers), for runs in other processes."""
    import dataclasses

    from conftest import StubTokenizer, tiny_runtime

    from forerun import LLM
    from forerun.config import EngineConfig

    rt = dataclasses.replace(tiny_runtime(seed=5), tokenizer=StubTokenizer())
    return LLM(runtime=rt, engine=EngineConfig(kv_cache_tokens=8192))


def digits_task(count: int = 5):
    """Questions the stub tokenizer can encode (numbers), with numeric references."""
    from forerun.scaling.tasks import NumericTask, Problem

    return NumericTask("digits", [Problem(f"p{i}", " ".join(str(3 + i + j) for j in range(20)), str(7 + i))
                                  for i in range(count)])

"""Greedy references shared by the equivalence tests: prompts, plain decoding, a datastore that
retrieval can hit, and two configurations of every registered method with its drafter installed."""
import numpy as np

from conftest import auto_with_random_head, random_eagle_head, random_medusa_head
from forerun import LLM, SamplingParams, SpecConfig
from forerun.drafters.auto import Auto
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.eagle import Eagle
from forerun.drafters.medusa import Medusa
from forerun.drafters.rasd import RetrievalAugmented
from forerun.retrieval.datastore import build, fingerprint_of

PROMPTS = [[1, 5, 9, 13, 5, 9], [7, 7, 7, 2], list(range(3, 40, 3)) * 2]
GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)


def generate(llm: LLM, prompt, spec, params=GREEDY, drafter=None):
    if drafter is not None:
        llm.use_drafter(spec, drafter)
    return llm.generate_ids(prompt, params, spec)


def reference(llm, prompt):
    return generate(llm, prompt, SpecConfig(method="ar")).token_ids


def datastore_for(llm, tmp_path, extra_docs=()) -> str:
    """A datastore holding the greedy continuations of two of the prompts (so retrieval hits) and
    random documents (so it also proposes wrong branches)."""
    rng = np.random.default_rng(0)
    docs = [p + reference(llm, p) for p in PROMPTS[:2]] + [rng.integers(0, 64, 50).tolist() for _ in range(20)]
    path = tmp_path / f"ds-{llm.runtime.name}"
    build([*docs, *extra_docs], fingerprint_of(llm.runtime)).save(path)
    return str(path)


def specs_for(method: str, datastore: str) -> list[SpecConfig]:
    """Two configurations of the method with different tree sizes (batched together)."""
    options = {"datastore": datastore} if method in ("retrieval", "rasd") else {}
    small = dict(num_draft=2, max_draft=3)
    if method in ("draft", "rasd"):
        return [SpecConfig(method=method, tree_width=2, options=options, **small),
                SpecConfig(method=method, tree_width=1, options=options)]
    if method in ("recycle", "stand"):
        return [SpecConfig(method=method, options={"nodes": 8}), SpecConfig(method=method, options={"nodes": 40})]
    if method == "lookahead":
        return [SpecConfig(method=method, options={"window": 2, "ngram": 3}), SpecConfig(method=method)]
    if method in ("eagle", "medusa"):
        always = {"min_accept": 0.0}  # a random head doubts every draft: draft anyway
        return [SpecConfig(method=method, tree_width=2, options={"nodes": 6, **always}, **small),
                SpecConfig(method=method, options=always)]
    if method == "auto":  # drafting and rows free: a candidate drafts whenever one is expected to be accepted
        free = {"row_cost": 0.0, "timed": False}
        return [SpecConfig(method=method, options={"candidates": "pld,recycle", **free}, **small),
                SpecConfig(method=method, tree_width=2, options={"candidates": "eagle,pld", **free})]
    if method == "retrieval":
        return [SpecConfig(method=method, options={**options, "retrieved_nodes": 4}),
                SpecConfig(method=method, options=options)]
    return [SpecConfig(method=method, **small), SpecConfig(method=method)]


def install_drafters(llm: LLM, specs: list[SpecConfig], draft_runtime) -> None:
    """draft and rasd drafters with an in-memory draft model (another random model: mostly wrong), eagle
    and medusa with a random head."""
    for spec in specs:
        if spec.method == "draft":
            llm.use_drafter(spec, DraftModel(llm.runtime, spec, draft=draft_runtime))
        elif spec.method == "rasd":
            llm.use_drafter(spec, RetrievalAugmented(llm.runtime, spec, draft=draft_runtime))
        elif spec.method == "eagle":  # a head with random weights: mostly wrong drafts
            llm.use_drafter(spec, Eagle(llm.runtime, spec, head=random_eagle_head(llm.runtime, draft_vocab=32)))
        elif spec.method == "medusa":
            llm.use_drafter(spec, Medusa(llm.runtime, spec, head=random_medusa_head(llm.runtime, draft_vocab=32)))
        elif spec.method == "auto" and "eagle" in dict(spec.options)["candidates"]:
            llm.use_drafter(spec, auto_with_random_head(llm.runtime, spec))


class WatchedAuto(Auto):
    """auto that records which candidate each step drafted with (None: a plain step)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chosen = []

    def propose_batch(self, seqs, depths):
        drafts = super().propose_batch(seqs, depths)
        self.chosen += [seq.draft_state.chosen for seq in seqs]
        return drafts

"""Greedy references shared by the equivalence tests: prompts, plain decoding, a datastore that
retrieval can hit."""
import numpy as np

from forerun import LLM, SamplingParams, SpecConfig
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

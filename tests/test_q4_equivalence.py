"""Greedy speculative decoding on a q4 model (4-bit blocks, 8-bit head, on the native kernels where they
build) must reproduce greedy `ar` on the same model, for the methods test_equivalence.py does not run
on q4: retrieval, rasd, del and lookahead. Verification forwards of many rows and plain forwards of one
must round alike for this to hold, which is what quantized kernels can get wrong."""
import pytest

from conftest import DEVICE, continuations_datastore, tiny_runtime
from helpers_decoding import PROMPTS
from forerun import LLM, SamplingParams, SpecConfig
from forerun.drafters.rasd import RetrievalAugmented

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(DEVICE != "cpu", reason="q4 is a CPU format")]

GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)


def q4_runtime(seed: int, **kw):
    runtime = tiny_runtime("llama", seed=seed, **kw)
    assert runtime.model.quantize()
    return runtime


@pytest.fixture(scope="module")
def llm():
    return LLM(runtime=q4_runtime(seed=1))


@pytest.fixture(scope="module")
def datastore(llm, tmp_path_factory):
    """The greedy continuations of the first two prompts (retrieval hits there) and random documents."""
    return continuations_datastore(llm.runtime, tmp_path_factory.mktemp("datastore"), PROMPTS[:2])


@pytest.fixture(scope="module")
def reference(llm):
    return {tuple(p): llm.generate_ids(p, GREEDY, SpecConfig()).token_ids for p in PROMPTS}


def run(llm, prompt, spec, drafter=None):
    if drafter is not None:
        llm.use_drafter(spec, drafter)
    return llm.generate_ids(prompt, GREEDY, spec)


def test_retrieval_matches_ar(llm, datastore, reference):
    for options in ({"datastore": datastore}, {"datastore": datastore, "retrieved_nodes": 4, "depth": 3, "n_min": 1}):
        spec = SpecConfig(method="retrieval", options=options)
        for prompt in PROMPTS:
            assert run(llm, prompt, spec).token_ids == reference[tuple(prompt)]
    hit = run(llm, PROMPTS[0], SpecConfig(method="retrieval", options={"datastore": datastore}))
    assert hit.stats.mean_accepted > 3  # the continuation is in the datastore


@pytest.mark.parametrize("same", [True, False], ids=["draft-is-target", "other-draft"])
def test_rasd_matches_ar(llm, datastore, reference, same):
    draft = llm.runtime if same else q4_runtime(seed=2, layers=2)
    spec = SpecConfig(method="rasd", tree_width=2, num_draft=3, options={"datastore": datastore, "retrieved_nodes": 8})
    for prompt in PROMPTS:
        out = run(llm, prompt, spec, drafter=RetrievalAugmented(llm.runtime, spec, draft=draft))
        assert out.token_ids == reference[tuple(prompt)]
        if same:
            assert out.stats.mean_accepted > 2.5


@pytest.mark.parametrize("options", [{}, {"layers": "1,3", "probe_every": 1, "min_length": 2}], ids=str)
def test_del_matches_ar(llm, reference, options):
    spec = SpecConfig(method="del", options=options)
    for prompt in PROMPTS:
        assert run(llm, prompt, spec).token_ids == reference[tuple(prompt)]


@pytest.mark.parametrize("options", [{}, {"window": 3, "ngram": 3, "candidates": 2, "pool_from_prompt": False}],
                         ids=str)
def test_lookahead_matches_ar(llm, reference, options):
    spec = SpecConfig(method="lookahead", options=options)
    for prompt in PROMPTS:
        assert run(llm, prompt, spec).token_ids == reference[tuple(prompt)]

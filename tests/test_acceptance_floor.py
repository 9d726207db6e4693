"""Every speculative method must match `ar` *and* accept drafts where it can: a drafter that silently
proposes nothing would pass any equivalence test, so each run here also has a floor on tau (new tokens
per target forward, stats.mean_accepted).

The text is the cycle model's (conftest.cycle_runtime) after the prompt has gone round the cycle once,
so every method sees what comes next: in the prompt (pld, lookahead), a datastore holding the cycle
(retrieval, rasd), a draft model that is the target itself (draft, rasd), a shallow exit that agrees
with the full model (layer-skip, del), or what a first request taught it (recycle, stand, del learn
across requests; their floor applies to a second request). FLOOR = 3 asks for more than two tokens per
forward on average: proposing nothing gives 1, proposing a single token at most 2.
"""
import pytest

from conftest import cycle_case
from forerun import LLM, SamplingParams, SpecConfig
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.rasd import RetrievalAugmented
from forerun.drafters.registry import methods

pytestmark = pytest.mark.usefixtures("single_thread")

FLOOR = 3.0
LEARN_ACROSS_REQUESTS = {"recycle", "stand", "del"}
# every registered drafter; eagle's and medusa's floors need a head trained on the cycle model
# (test_eagle.py and test_medusa.py train one and check it there)
METHODS = [m for m in methods() if m not in ("ar", "eagle", "medusa")]
PARAMS = SamplingParams(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module", params=["float32", "q4"])
def world(request, tmp_path_factory):
    """(runtime, prompt, ar's output, datastore directory)."""
    runtime, cycle, prompt, store = cycle_case(request.param, 1, tmp_path_factory)
    ar = LLM(runtime=runtime).generate_ids(prompt, PARAMS, SpecConfig()).token_ids
    assert ar == (cycle[4:] + cycle)[:PARAMS.max_new_tokens]  # the model follows its cycle
    return runtime, prompt, ar, store


@pytest.mark.parametrize("method", METHODS)
def test_matches_ar_and_accepts_drafts(world, method):
    runtime, prompt, ar, store = world
    spec = SpecConfig(method=method, options={"datastore": store} if method in ("retrieval", "rasd") else {})
    llm = LLM(runtime=runtime)
    if method == "draft":
        llm.use_drafter(spec, DraftModel(runtime, spec, draft=runtime))
    elif method == "rasd":
        llm.use_drafter(spec, RetrievalAugmented(runtime, spec, draft=runtime))
    first = llm.generate_ids(prompt, PARAMS, spec)
    second = llm.generate_ids(prompt, PARAMS, spec)
    assert first.token_ids == second.token_ids == ar
    measured = second if method in LEARN_ACROSS_REQUESTS else first
    tau = measured.stats.mean_accepted
    assert tau > FLOOR, f"{method}: {tau:.2f} tokens per target forward, where drafts must be accepted"

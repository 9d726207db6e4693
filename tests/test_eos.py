"""An EOS token inside an accepted draft ends generation where plain decoding ends it, for every method:
the same ids as `ar`, stopping before the EOS, with finish_reason "eos".

The tiny models have no tokenizer, so these runs give the cycle model of conftest.cycle_runtime a stub
one whose EOS is the third token plain decoding emits. The prompt has already gone round the cycle
once, so every method can see what comes next (in the prompt, its datastore, its memory, a draft model
that is the target itself, or a shallow exit that agrees with the full model) and must accept a draft
that runs through the EOS; the step's token count in stats.accept_histogram shows it did.
"""
import pytest

from conftest import StubTokenizer, cycle_case, cycle_runtime
from forerun import LLM, SamplingParams, SpecConfig
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.rasd import RetrievalAugmented

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = ["ar", "pld", "draft", "layer-skip", "recycle", "stand", "retrieval", "rasd", "del", "lookahead"]
EOS_AT = 2  # plain decoding emits two tokens, then the EOS
STOPPING = SamplingParams(max_new_tokens=40)
IGNORING = SamplingParams(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module", params=["float32", "q4"])
def world(request, tmp_path_factory):
    """(runtime with the stub tokenizer, prompt, EOS id, datastore directory)."""
    seed = 0
    eos = cycle_runtime(seed=seed)[1][4 + EOS_AT]  # the cycle depends on the seed alone
    runtime, cycle, prompt, store = cycle_case(request.param, seed, tmp_path_factory, StubTokenizer([eos]))
    assert cycle[4 + EOS_AT] == eos
    return runtime, prompt, eos, store


def llm_for(world, method: str) -> tuple[LLM, SpecConfig]:
    runtime, _, _, store = world
    spec = SpecConfig(method=method, options={"datastore": store} if method in ("retrieval", "rasd") else {})
    llm = LLM(runtime=runtime)
    if method == "draft":  # the target as its own draft model: always right
        llm.use_drafter(spec, DraftModel(runtime, spec, draft=runtime))
    elif method == "rasd":
        llm.use_drafter(spec, RetrievalAugmented(runtime, spec, draft=runtime))
    return llm, spec


@pytest.mark.parametrize("method", METHODS)
def test_eos_inside_an_accepted_draft_stops_like_ar(world, method):
    runtime, prompt, eos, _ = world
    ar = LLM(runtime=runtime)
    plain = ar.generate_ids(prompt, STOPPING, SpecConfig())
    assert plain.finish_reason == "eos" and len(plain.token_ids) == EOS_AT and eos not in plain.token_ids
    llm, spec = llm_for(world, method)
    # A first request that runs past the EOS: it must match ar there too, and it teaches the drafters
    # that learn across requests (recycle, stand, del) what the second one needs.
    past = llm.generate_ids(prompt, IGNORING, spec)
    assert past.token_ids == ar.generate_ids(prompt, IGNORING, SpecConfig()).token_ids
    assert past.token_ids[EOS_AT] == eos and past.finish_reason == "length"
    out = llm.generate_ids(prompt, STOPPING, spec)
    assert out.token_ids == plain.token_ids and out.finish_reason == "eos"
    assert out.text == runtime.tokenizer.decode(plain.token_ids)
    # Tokens the steps produced, EOS and anything after it included, beyond those returned.
    dropped = sum(tokens * steps for tokens, steps in out.stats.accept_histogram.items()) - len(out.token_ids)
    if method == "ar":
        assert dropped == 1
    else:
        assert dropped >= 2, f"{method}: the EOS ended its step, so it was never inside an accepted draft"

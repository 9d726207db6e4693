"""SpecConfig(budget="goodput") cuts each greedy draft tree to the nodes
worth their rows; the output must stay `ar`'s for draft, rasd and del, in float32 and q4.
With a steep cost line (rows dear) most trees are cut to a part, which the test checks happened; with
the measured line, whatever this machine's timings choose."""
import pytest

from conftest import DEVICE, continuations_datastore, tiny_runtime
from helpers_decoding import PROMPTS
from forerun import LLM, SamplingParams, SpecConfig
from forerun.engine.goodput import Goodput, RowCost
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.rasd import RetrievalAugmented

pytestmark = pytest.mark.usefixtures("single_thread")

GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)


def runtime(seed: int, quant: bool, **kw):
    rt = tiny_runtime("llama", seed=seed, **kw)
    if quant:
        assert rt.model.quantize()
    return rt


@pytest.fixture(scope="module", params=["float32", "q4"])
def world(request, tmp_path_factory):
    """(llm, a different random draft model, datastore directory, ar's output per prompt)."""
    quant = request.param == "q4"
    if quant and DEVICE != "cpu":
        pytest.skip("q4 is a CPU format")
    llm = LLM(runtime=runtime(1, quant))
    store = continuations_datastore(llm.runtime, tmp_path_factory.mktemp("datastore"), PROMPTS[:2])
    reference = {tuple(p): llm.generate_ids(p, GREEDY, SpecConfig()).token_ids for p in PROMPTS}
    return llm, runtime(2, quant, layers=2), store, reference


@pytest.fixture
def cut_sizes(monkeypatch):
    """Records (size before, size after) of every cut, and (depth offered, depth planned) of every
    chain the policy set a depth for before drafting (model drafters), as (depth + 1, planned + 1)."""
    sizes, cut, depths = [], Goodput.cut, Goodput.depths

    def spy(self, entries, sure_rows, sure_tokens):
        out = cut(self, entries, sure_rows, sure_tokens)
        sizes.extend((e.draft.size, d.size) for e, d in zip(entries, out))
        return out

    def spy_depths(self, chains, sure_rows, sure_tokens):
        out = depths(self, chains, sure_rows, sure_tokens)
        sizes.extend((chain.depth + 1, planned + 1) for chain, planned in zip(chains, out))
        return out

    monkeypatch.setattr(Goodput, "cut", spy)
    monkeypatch.setattr(Goodput, "depths", spy_depths)
    return sizes


def spec_and_drafter(world, method: str, same: bool):
    llm, other, store, _ = world
    draft = llm.runtime if same else other
    if method == "draft":
        spec = SpecConfig(method="draft", tree_width=2, num_draft=3, budget="goodput")
        return spec, DraftModel(llm.runtime, spec, draft=draft)
    if method == "rasd":
        spec = SpecConfig(method="rasd", tree_width=2, num_draft=3, budget="goodput",
                          options={"datastore": store, "retrieved_nodes": 8})
        return spec, RetrievalAugmented(llm.runtime, spec, draft=draft)
    # min_length: DEL always drafts a chain, so there is something to cut
    return SpecConfig(method="del", budget="goodput", options={"min_length": 3, "probe_every": 1}), None


@pytest.mark.parametrize("line", [(1.0, 0.15), None], ids=["steep", "measured"])
@pytest.mark.parametrize("method, same", [("draft", True), ("draft", False), ("rasd", True), ("rasd", False),
                                          ("del", None)], ids=["draft-same", "draft-other", "rasd-same",
                                                               "rasd-other", "del"])
def test_cut_drafts_match_ar(world, cut_sizes, monkeypatch, method, same, line):
    llm, _, _, reference = world
    if line is not None:
        monkeypatch.setattr(RowCost, "curve", lambda self: lambda rows: line[0] + line[1] * rows)
    spec, drafter = spec_and_drafter(world, method, same)
    llm.engine.forget(spec)  # a fresh drafter, guard and odds for this case
    if drafter is not None:
        llm.use_drafter(spec, drafter)
    llm.engine.goodput = Goodput()  # what another test's runs measured stays there
    for prompt in PROMPTS:
        assert llm.generate_ids(prompt, GREEDY, spec).token_ids == reference[tuple(prompt)]
    if line is not None:
        assert any(1 < after < before for before, after in cut_sizes), "no draft was cut (or planned) to a part"

"""Greedy speculative decoding must reproduce greedy autoregressive decoding token for token."""
import pytest
import torch

from conftest import VOCAB, tiny_hf_runtime, tiny_runtime
from helpers_decoding import GREEDY, PROMPTS, generate, reference
from forerun import LLM, SpecConfig
from forerun.drafters.base import Drafter, chain
from forerun.drafters.draft_model import DraftModel
from forerun.tree import Tree
from forerun.types import Draft


class Oracle(Drafter):
    """Proposes the true greedy continuation (always right), or a corrupted one (always wrong)."""

    def __init__(self, target, spec, truth: list[int], wrong: bool, width: int = 1):
        super().__init__(target, spec)
        self.truth, self.wrong, self.width = truth, wrong, width

    def propose(self, seq, budget):
        done = len(seq.tokens)
        future = self.truth[done:done + budget]
        if self.wrong:
            future = [(t + 1) % VOCAB for t in future]
        if self.width == 1 or not future:
            return chain(seq, future)
        # A tree: a wrong sibling before the right child at every level.
        tokens, parents, last = [seq.root], [-1], 0
        for t in future:
            tokens += [(t + 7) % VOCAB, t]
            parents += [last, last]
            last = len(tokens) - 1
        return Draft(Tree(tokens=torch.tensor(tokens), parents=parents))


def draft_runtime(llm, seed: int):
    """Another random model of the target's kind (mostly wrong as a drafter)."""
    arch = llm.runtime.model.args.arch
    if arch.startswith("transformers:"):
        return tiny_hf_runtime(seed=seed, layers=2)
    return tiny_runtime(arch, seed=seed, layers=2, **({"sliding_window": 16} if arch == "mistral" else {}))


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "mistral", "llama-q4", "gpt2-transformers"])
def llm(request):
    if request.param == "gpt2-transformers":  # the transformers adapter, for models outside the family
        pytest.importorskip("transformers")
        return LLM(runtime=tiny_hf_runtime(seed=1))
    arch, _, quant = request.param.partition("-")
    kw = {"sliding_window": 16} if arch == "mistral" else {}
    runtime = tiny_runtime(arch, seed=1, **kw)
    if quant:  # q4 blocks, q8 head, on the native kernels where they build
        if runtime.device.type != "cpu":
            pytest.skip("q4 is a CPU format")
        assert runtime.model.quantize()
    return LLM(runtime=runtime)


@pytest.mark.parametrize("wrong", [False, True])
@pytest.mark.parametrize("width", [1, 2])
def test_oracle_drafts_match_ar(llm, wrong, width):
    for prompt in PROMPTS:
        ref = reference(llm, prompt)
        spec = SpecConfig(method="ar", num_draft=3, max_draft=6)
        truth = prompt + ref
        out = generate(llm, prompt, spec, drafter=Oracle(llm.runtime, spec, truth, wrong, width))
        assert out.token_ids == ref
        if wrong:
            assert out.stats.target_forwards == len(ref)
        else:
            assert out.stats.target_forwards < len(ref) / 2


@pytest.mark.parametrize("spec", [
    SpecConfig(method="pld"),
    SpecConfig(method="pld", adaptive=False, num_draft=6, max_draft=6),
    SpecConfig(method="layer-skip", exit_layer=2),
    SpecConfig(method="layer-skip", exit_layer=1, adaptive=False, num_draft=3),
], ids=str)
def test_methods_match_ar(llm, spec):
    if spec.method == "layer-skip" and llm.runtime.model.args.arch.startswith("transformers:"):
        with pytest.raises(ValueError, match="partial forwards"):
            generate(llm, PROMPTS[0], spec)
        return
    for prompt in PROMPTS:
        out = generate(llm, prompt, spec)
        assert out.token_ids == reference(llm, prompt)
        assert out.stats.new_tokens == GREEDY.max_new_tokens


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("same", [True, False])
def test_draft_model_matches_ar(llm, width, same):
    """A draft model identical to the target is always right; a different random one mostly wrong."""
    spec = SpecConfig(method="draft", tree_width=width, num_draft=3)
    draft = llm.runtime if same else draft_runtime(llm, seed=2)
    for prompt in PROMPTS:
        drafter = DraftModel(llm.runtime, spec, draft=draft)
        out = generate(llm, prompt, spec, drafter=drafter)
        ref = reference(llm, prompt)
        assert out.token_ids == ref
        if same:
            assert out.stats.mean_accepted > 2.5


def test_pld_accepts_on_repetitive_text(llm):
    prompt = list(range(10, 30)) * 3
    out = generate(llm, prompt, SpecConfig(method="pld"))
    assert out.token_ids == reference(llm, prompt)

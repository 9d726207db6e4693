"""Token Recycling, STAND n-grams and dynamic draft-model trees: greedy output equals `ar`, and sampled
output follows the target's distribution (the decode loop end to end, and STAND's proposer alone)."""
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_runtime
from helpers_distribution import (E2E_PARAMS, E2E_PROMPT, E2E_TRIALS, TRIALS, assert_distributed_as,
                                  assert_first_two_match, bigram_world, emit_pairs, exact_first_two, flat_runtime)
from helpers_decoding import PROMPTS, generate, reference
from forerun import LLM, SamplingParams, SpecConfig
from forerun.engine.sequence import Sequence
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.recycle import TokenRecycling
from forerun.drafters.stand import Stand
from forerun.drafters.tree_shape import cut_shape, grow_shape

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def llm():
    return LLM(runtime=tiny_runtime("qwen2", seed=1))


@pytest.mark.parametrize("spec", [
    SpecConfig(method="recycle"),
    SpecConfig(method="recycle", adaptive=False, num_draft=6, max_draft=6, options={"nodes": 12, "k": 3}),
    SpecConfig(method="stand"),
    SpecConfig(method="stand", adaptive=False, num_draft=5, max_draft=5,
               options={"n": 2, "nodes": 16, "reshape_every": 2}),
], ids=lambda s: f"{s.method}-{dict(s.options)}")
def test_model_free_trees_match_ar(llm, spec):
    """Trees of 40 nodes also exercise the shrinking near the token limit: the engine's cache only
    leaves room for chain-sized drafts there."""
    for prompt in PROMPTS:
        out = generate(llm, prompt, spec)
        assert out.token_ids == reference(llm, prompt)


@pytest.mark.parametrize("method", ["recycle", "stand"])
def test_memory_persists_and_pays_off(llm, method):
    """The second run of a prompt drafts from what the first one taught the drafter."""
    spec = SpecConfig(method=method, max_draft=8)
    prompt = PROMPTS[2]
    first, second = generate(llm, prompt, spec), generate(llm, prompt, spec)
    assert second.token_ids == first.token_ids == reference(llm, prompt)
    assert second.stats.mean_accepted > max(first.stats.mean_accepted, 1.5)


@pytest.mark.parametrize("same", [True, False])
def test_dynamic_draft_tree_matches_ar(llm, same):
    spec = SpecConfig(method="draft", num_draft=3, options={"tree": "dynamic", "nodes": 10, "branch": 3})
    draft = llm.runtime if same else tiny_runtime("qwen2", seed=2, layers=2)
    for prompt in PROMPTS:
        out = generate(llm, prompt, spec, drafter=DraftModel(llm.runtime, spec, draft=draft))
        assert out.token_ids == reference(llm, prompt)
        if same:
            assert out.stats.mean_accepted > 2.5


def test_recycle_matrix_fits_2mb_for_smollm_vocab():
    target = SimpleNamespace(model=SimpleNamespace(args=SimpleNamespace(vocab_size=49152)))
    assert TokenRecycling(target, SpecConfig(method="recycle")).successors.nbytes < 2 * 2**20


ACCEPT = lambda depth, rank: 0.9 ** rank / depth  # noqa: E731


def values(shape) -> list[float]:
    """Each node's value: the product of ACCEPT(depth, sibling rank) along its path."""
    out = [1.0]
    for parent, depth, rank in zip(shape.parents[1:], shape.depths[1:], shape.ranks[1:]):
        out.append(out[parent] * ACCEPT(depth, rank))
    return out


def test_grown_shape_is_best_first_and_its_cut_keeps_the_best():
    """Nodes come in falling value only if each was grown for the rank it holds among its siblings."""
    shape = grow_shape(ACCEPT, nodes=30, max_depth=4, max_rank=5)
    assert shape.size == 30 and max(shape.depths) <= 4 and max(shape.ranks) < 5
    assert values(shape) == sorted(values(shape), reverse=True)
    cut = cut_shape(shape, 12, 2)
    shallow = [v for v, depth in zip(values(shape), shape.depths) if depth <= 2]
    assert cut.size == 12 and max(cut.depths) <= 2 and values(cut) == shallow[:12]


# --- distributions at temperature > 0 -------------------------------------------------------------

def stand_proposer(P: torch.Tensor, Q: torch.Tensor):
    """STAND's own drafting, its memory filled with Q: after token a, the distribution Q[a]."""
    V = Q.shape[0]
    target = SimpleNamespace(model=SimpleNamespace(args=SimpleNamespace(vocab_size=V)))
    spec = SpecConfig(method="stand", options={"nodes": 7, "depth": 2, "k": 4})
    stand = Stand(target, spec)
    for a in range(V):
        order = torch.argsort(Q[a], descending=True)[:4]
        stand.memory.update([a], order.numpy(), Q[a, order].double().numpy())
    params = SamplingParams(temperature=1.0)

    def propose(root, Q, rng):
        seq = Sequence(tokens=[root], prompt_len=1, params=params, generator=rng.torch, room=100)
        return stand.propose(seq, depth=2)
    return propose


def test_stand_proposer_keeps_sampling_exact():
    """Its q rows (stored top-4, renormalised over undrawn siblings) must be what it really drew from."""
    P, Q = bigram_world(V=6, seed=1)
    propose = stand_proposer(P, Q)
    assert propose(0, Q, SimpleNamespace(torch=torch.Generator().manual_seed(0))).size > 3
    assert_first_two_match(emit_pairs(propose, P, Q, TRIALS), P)


@pytest.mark.parametrize("spec", [
    SpecConfig(method="draft", num_draft=2, max_draft=2, adaptive=False,
               options={"tree": "dynamic", "nodes": 5, "branch": 3}),
    SpecConfig(method="stand", num_draft=2, max_draft=2, adaptive=False, options={"nodes": 6, "k": 3}),
], ids=lambda s: f"{s.method}-{dict(s.options).get('tree', '')}")
def test_sampled_tree_drafts_follow_the_target(spec):
    target = flat_runtime(seed=3)
    llm = LLM(runtime=target)
    if spec.method == "draft":
        llm.use_drafter(spec, DraftModel(target, spec, draft=flat_runtime(seed=4)))
    joint = exact_first_two(target)
    runs = [llm.generate_ids(E2E_PROMPT, SamplingParams(seed=trial, **E2E_PARAMS), spec)
            for trial in range(E2E_TRIALS)]
    forwards = sum(run.stats.target_forwards for run in runs)
    assert forwards < 1.9 * E2E_TRIALS, "drafts were hardly ever accepted: only plain sampling was tested"
    pairs = torch.tensor([run.token_ids for run in runs])
    assert_distributed_as(pairs[:, 0], joint.sum(1), "first token")
    assert_distributed_as(pairs[:, 1], joint.sum(0), "second token")
    assert_distributed_as(pairs[:, 0] * joint.shape[0] + pairs[:, 1], joint.flatten(), "pair")

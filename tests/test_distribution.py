"""Stochastic verification must reproduce the target distribution exactly, whatever the draft.

The chi-square check, the toy bigram world and the tiny models' exact laws are in
helpers_distribution.py.
"""
import pytest
import torch

from helpers_distribution import (E2E_PARAMS, E2E_PROMPT, E2E_TRIALS, E2E_VOCAB, ROOT, TRIALS,
                                  assert_distributed_as, assert_first_two_match, bigram_world, chain, emit_pairs,
                                  exact_first_two, fixed_children, flat_runtime, iid_siblings, without_replacement)
from forerun import LLM, SamplingParams, SpecConfig
from forerun.drafters.draft_model import DraftModel
from forerun.sampling import target_probs
from forerun.types import Draft

pytestmark = pytest.mark.usefixtures("single_thread")

PROPOSERS = {
    "chain-1": chain(1),
    "chain-2": chain(2),
    "iid-siblings-3": iid_siblings(3),
    "without-replacement-3": without_replacement(3),
    "without-replacement-2-deep": without_replacement(2, grandchildren=True),
    "fixed-children": fixed_children([3, 1]),
}


@pytest.mark.parametrize("name", list(PROPOSERS))
def test_emitted_tokens_follow_target(name):
    P, Q = bigram_world(V=6, seed=1)
    assert_first_two_match(emit_pairs(PROPOSERS[name], P, Q, TRIALS), P)


def test_processed_target_distribution():
    """With temperature, top-k and top-p, the processed p is what must come out, and tokens the
    processing removed never do, even though the raw draft distribution proposes them."""
    V = 8
    g = torch.Generator().manual_seed(7)
    logits = 2.0 * torch.randn(V, V, generator=g)
    P = target_probs(logits, SamplingParams(temperature=0.7, top_k=4, top_p=0.9))
    Q = torch.softmax(logits + torch.randn(V, V, generator=g), dim=-1)  # an unprocessed, noisy drafter
    assert ((P == 0).sum(-1) >= V - 4).all()
    pairs = emit_pairs(chain(2), P, Q, TRIALS, seed=3)
    assert_first_two_match(pairs, P)
    assert P[ROOT][pairs[:, 0]].gt(0).all() and P[pairs[:, 0], pairs[:, 1]].gt(0).all()


def claim_uniform(draft: Draft) -> Draft:
    return Draft(draft.tree, torch.full_like(draft.q, 1 / draft.q.shape[1]))


def claim_iid(draft: Draft) -> Draft:
    """The classic slip: siblings drawn without replacement verified as if drawn i.i.d."""
    q = draft.q.clone()
    q[1:] = draft.q[1]
    return Draft(draft.tree, q)


@pytest.mark.parametrize("propose, wrong_q", [
    (chain(1), claim_uniform),  # total-variation error ~0.25 in the first token
    (without_replacement(3), claim_iid),  # subtler: ~0.14
], ids=["uniform-q-for-chain", "iid-q-for-without-replacement"])
def test_negative_control_wrong_q_fails(propose, wrong_q):
    """Tokens drawn from one distribution but verified against another come out biased, and the same
    check must reject them: proof that the tests above have the power to see such a bug."""
    P, Q = bigram_world(V=6, seed=1)
    pairs = emit_pairs(propose, P, Q, TRIALS, q_seen=wrong_q)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_distributed_as(pairs[:, 0], P[ROOT], "first token")


# --- end to end: the whole decode loop with real (tiny) models ------------------------------------


@pytest.fixture(scope="module")
def target():
    return flat_runtime(seed=3)


@pytest.mark.parametrize("spec", [
    SpecConfig(method="draft", tree_width=2, num_draft=2, max_draft=2, adaptive=False),
    SpecConfig(method="layer-skip", num_draft=2, max_draft=2, adaptive=False),
], ids=lambda s: s.method)
def test_sampling_through_a_model_drafter_follows_the_target(target, spec):
    llm = LLM(runtime=target)
    if spec.method == "draft":
        llm.use_drafter(spec, DraftModel(target, spec, draft=flat_runtime(seed=4)))
    joint = exact_first_two(target)
    assert joint.sum(1).max() < 0.9, "the target is too peaked for the test to mean anything"
    runs = [llm.generate_ids(E2E_PROMPT, SamplingParams(seed=trial, **E2E_PARAMS), spec)
            for trial in range(E2E_TRIALS)]
    forwards = sum(run.stats.target_forwards for run in runs)
    assert forwards < 1.9 * E2E_TRIALS, "drafts were hardly ever accepted: only plain sampling was tested"
    pairs = torch.tensor([run.token_ids for run in runs])
    assert_distributed_as(pairs[:, 0], joint.sum(1), f"{spec.method}: first token")
    assert_distributed_as(pairs[:, 1], joint.sum(0), f"{spec.method}: second token")
    assert_distributed_as(pairs[:, 0] * E2E_VOCAB + pairs[:, 1], joint.flatten(), f"{spec.method}: pair")

"""`--method auto`: the choice among candidate drafters, and that any choice keeps the output exact.

The choice is scored on what the target committed (forerun.drafters.auto.expected_tokens); these tests
check that score on hand-made trees, that a candidate that is right is chosen over one that is wrong,
that no candidate drafts when none would pay, and that sampling through auto follows the target while
the candidate it picks changes with the sampled text (that one in test_sampling_end_to_end). Greedy
batched-equals-alone for auto is in test_engine with every other method.
"""
import pytest
import torch

from conftest import tiny_runtime
from helpers_decoding import WatchedAuto
from forerun import LLM, SamplingParams, SpecConfig
from forerun.drafters.auto import Auto, expected_tokens
from forerun.drafters.base import Drafter, chain, root_only
from forerun.tree import Tree
from forerun.types import Draft

pytestmark = pytest.mark.usefixtures("single_thread")

FREE = {"row_cost": 0.0, "timed": False}  # judge candidates by accepted tokens alone


def tree(tokens, parents) -> Draft:
    return Draft(Tree(tokens=torch.tensor(tokens), parents=parents))


def test_expected_tokens_greedy_follows_the_committed_path():
    committed = [5, 6, 7]  # two accepted tokens, then the next one
    assert expected_tokens(tree([1, 5, 6, 9], [-1, 0, 1, 2]), committed, None) == 2  # third draft wrong
    assert expected_tokens(tree([1, 5, 6, 7, 8], [-1, 0, 1, 2, 3]), committed, None) == 3  # beyond: unknown
    assert expected_tokens(tree([1, 4, 5, 6], [-1, 0, 0, 2]), committed, None) == 2  # through a sibling
    assert expected_tokens(tree([1, 4], [-1, 0]), committed, None) == 0
    assert expected_tokens(tree([1], [-1]), committed, None) == 0


def test_expected_tokens_sampled_sums_siblings_and_multiplies_down_the_path():
    probs = torch.zeros(2, 10)
    probs[0, 5], probs[0, 4], probs[1, 6] = 0.5, 0.25, 0.8
    draft = tree([1, 5, 4, 6], [-1, 0, 0, 1])  # children 5 and 4 at the root, then 6 under 5
    # depth 1: p(5) + p(4) = 0.75; depth 2 through 5 (committed): 0.75 * 0.8
    assert expected_tokens(draft, [5, 6], probs) == pytest.approx(0.75 + 0.75 * 0.8)


class Oracle(Drafter):
    """Drafts the reference continuation (right every time) or, with `shift`, tokens next to it (wrong)."""

    def __init__(self, target, spec, reference, prompt_len, shift=0):
        super().__init__(target, spec)
        self.reference, self.prompt_len, self.shift = reference, prompt_len, shift

    def propose(self, seq, depth):
        done = len(seq.tokens) - self.prompt_len
        upcoming = self.reference[done:done + depth]
        return chain(seq, [(t + self.shift) % 64 for t in upcoming]) if upcoming else root_only(seq)


@pytest.fixture(scope="module")
def target():
    return tiny_runtime("llama", seed=1)


PROMPT = [3, 9, 4, 17, 2]
GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)


def test_the_right_candidate_is_chosen_and_the_output_is_unchanged(target):
    llm = LLM(runtime=target)
    reference = llm.generate_ids(PROMPT, GREEDY, SpecConfig(method="ar")).token_ids
    spec = SpecConfig(method="auto", adaptive=False, num_draft=4, options=FREE)
    auto = WatchedAuto(target, spec, candidates={
        "wrong": Oracle(target, spec, reference, len(PROMPT), shift=1),
        "right": Oracle(target, spec, reference, len(PROMPT))})
    llm.use_drafter(spec, auto)
    out = llm.generate_ids(PROMPT, GREEDY, spec)
    assert out.token_ids == reference
    assert auto.chosen.count("right") >= len(auto.chosen) - 2, auto.chosen  # from the second step on
    assert "wrong" not in auto.chosen
    assert out.stats.target_forwards <= 15  # about four tokens a step


def test_no_candidate_drafts_when_none_would_pay(target):
    llm = LLM(runtime=target)
    reference = llm.generate_ids(PROMPT, GREEDY, SpecConfig(method="ar")).token_ids
    spec = SpecConfig(method="auto", options={"row_cost": 0.2, "timed": False})
    auto = WatchedAuto(target, spec, candidates={"wrong": Oracle(target, spec, reference, len(PROMPT), shift=1)})
    llm.use_drafter(spec, auto)
    out = llm.generate_ids(PROMPT, GREEDY, spec)
    assert out.token_ids == reference
    assert set(auto.chosen) == {None}, auto.chosen  # a wrong draft's rows cost more than a plain step
    assert out.stats.draft_tokens == 0


def test_options_name_candidates_and_route_their_own_options(target):
    auto = Auto(target, SpecConfig(method="auto", options={"candidates": "pld,recycle", "recycle.nodes": 8}))
    assert list(auto.candidates) == ["pld", "recycle"]
    assert auto.candidates["recycle"].shape.size == 8
    # "+" separates too, where the list sits inside a comma-separated one (forerun bench --methods)
    assert list(Auto(target, SpecConfig(method="auto", options={"candidates": "recycle+pld"})).candidates) == ["recycle", "pld"]
    for bad in ({"candidates": "pld,stand"}, {"candidates": "pld,pld"}, {"candidates": "pld", "eagle.nodes": 4},
                {"probe_every": 0}, {"weight": 0.0}, {"nodes": 3}):
        with pytest.raises(ValueError):
            Auto(target, SpecConfig(method="auto", options=bad))


def test_without_a_fitting_head_the_default_skips_eagle(target):
    assert list(Auto(target, SpecConfig(method="auto")).candidates) == ["pld"]
    with pytest.raises(ValueError):  # named explicitly, a missing head is an error
        Auto(target, SpecConfig(method="auto", options={"candidates": "eagle,pld"}))

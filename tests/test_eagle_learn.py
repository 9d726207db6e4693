"""Online adaptation of an EAGLE-3 head (`learn`, forerun.heads.online): acceptance rises as the head
trains on the text it drafts for, outputs never change (greedy equals `ar`, alone and in a batch, with
the learner swapping weights in the background), and the positions the head already had right are left
out of the loss."""
import random

import pytest
import torch

from conftest import cycle_runtime, random_eagle_head
from helpers_decoding import GREEDY, reference
from forerun import LLM, SpecConfig
from forerun.cli import build_parser
from forerun.cli_args import spec_config
from forerun.config import EngineConfig
from forerun.drafters.eagle import Eagle
from forerun.heads.online import LearnConfig, OnlineLearner, Record
from forerun.heads.train import target_rows

pytestmark = pytest.mark.usefixtures("single_thread")

AUX = (1, 2, 3)


def learning_llm(seed: int, config: LearnConfig, background: bool) -> tuple[LLM, SpecConfig, Eagle]:
    """The cycle model (conftest.cycle_runtime) with a random head that learns."""
    runtime, _ = cycle_runtime(seed=seed)
    llm = LLM(runtime=runtime, engine=EngineConfig(prefix_caching=False, max_num_seqs=8))
    spec = SpecConfig(method="eagle", num_draft=4, adaptive=False, options={"min_accept": 0.0})
    drafter = Eagle(runtime, spec, head=random_eagle_head(runtime, seed=seed, aux=AUX))
    drafter.learner = OnlineLearner(drafter.head, target_rows(runtime, drafter.head.draft_ids), config, background)
    llm.use_drafter(spec, drafter)
    return llm, spec, drafter


@pytest.mark.parametrize("fc", [False, True], ids=["layer", "layer+fc"])
def test_acceptance_rises_as_the_head_learns_and_outputs_stay_those_of_ar(fc):
    llm, spec, drafter = learning_llm(3, LearnConfig(lr=3e-3, publish_every=1, chunk=16, passes=80, fc=fc),
                                      background=False)
    fc_before = drafter.head.fc.weight.detach().clone()
    rng = random.Random(0)
    taus = []
    for _ in range(12):
        prompt = [rng.randrange(64) for _ in range(6)]
        out = llm.generate_ids(prompt, GREEDY, spec)
        assert out.token_ids == reference(llm, prompt)
        taus.append(out.stats.mean_accepted)
        while drafter.learner.step():
            pass
        drafter.learner.publish()
    assert drafter.learner.steps > 0 and drafter.learner.positions > 0
    assert taus[0] < 1.2 and min(taus[-3:]) > taus[0] + 0.8, taus
    assert torch.equal(drafter.head.fc.weight, fc_before) != fc  # fc learns only when asked, in raw features' terms
    if fc:
        drafter._take_learned()  # the last round's offer
        scaled = drafter.learner.model.fc.weight.detach() / drafter.learner.scale
        torch.testing.assert_close(drafter.head.fc.weight.detach(), scaled)


def test_a_background_learner_never_changes_a_batch():
    llm, spec, drafter = learning_llm(4, LearnConfig(lr=3e-3, publish_every=1, chunk=8), background=True)
    try:
        rng = random.Random(1)
        prompts = [[rng.randrange(64) for _ in range(rng.randrange(3, 9))] for _ in range(6)]
        for _ in range(3):
            outs = llm.generate_batch_ids(prompts, GREEDY, spec)
            assert [o.token_ids for o in outs] == [reference(llm, p) for p in prompts]
        assert drafter.learner.steps > 0
    finally:
        drafter.learner.close()


def foreground_learner(seed: int, config: LearnConfig) -> tuple[OnlineLearner, int, int]:
    """(a learner trained in the caller's thread for a random head of the cycle model, the head's
    feature size, its hidden size)."""
    runtime, _ = cycle_runtime(seed=seed)
    head = random_eagle_head(runtime, seed=seed, aux=AUX)
    learner = OnlineLearner(head, target_rows(runtime, head.draft_ids), config, background=False)
    return learner, head.config.feature_size, head.config.hidden_size


def test_positions_the_head_had_right_are_left_out_of_the_loss():
    learner, F, D = foreground_learner(5, LearnConfig(chunk=1000, context=2))
    record = Record()
    learner.add(record, torch.randn(3, F), [7, 8, 9], 0)  # prompt rows: context, no labels
    choice = torch.tensor([10, 11, 12, 13])
    learner.add(record, torch.randn(4, F), [10, 11, 12, 13], 3, torch.randn(4, D), choice,
                torch.tensor([True, True, False, False]))
    learner.flush(record)
    assert len(learner.window) == 1 and learner.budget == learner.config.passes * 2
    example = learner.window[0]
    # row i is labelled with the target's choice after position i + 1, unless row i + 1's token was an
    # accepted draft (rows 3 and 4): so rows 2 and 3 are masked, rows 0 and 1 have no choice (prompt rows)
    draft = learner.draft_of
    assert example.label.tolist() == [-1, -1, -1, -1, int(draft[12]), int(draft[13])]
    assert example.tokens.tolist() == [7, 8, 9, 10, 11, 12]
    assert record.rows() == 0


def test_learn_is_an_option_of_eagle_and_auto():
    runtime, _ = cycle_runtime(seed=6)
    head = random_eagle_head(runtime, seed=6, aux=AUX)
    drafter = Eagle(runtime, SpecConfig(method="eagle", options={"learn": "1", "learn_lr": "1e-4"}), head=head)
    try:
        assert drafter.learner is not None and drafter.learner.config.lr == 1e-4
        assert drafter.head is not head  # the learned weights never reach a head other drafters share
    finally:
        drafter.learner.close()
    assert Eagle(runtime, SpecConfig(method="eagle"), head=head).learner is None
    parser = build_parser()
    assert spec_config(parser.parse_args(["generate", "hi", "--method", "eagle", "--learn"])).options == \
        (("learn", True),)
    assert dict(spec_config(parser.parse_args(["generate", "hi", "--method", "auto", "--learn"])).options) == \
        {"eagle.learn": True}
    with pytest.raises(ValueError, match="--learn goes with --method eagle or auto"):
        spec_config(parser.parse_args(["generate", "hi", "--method", "pld", "--learn"]))


def test_a_long_sequence_is_cut_into_examples_that_label_every_row_once():
    learner, F, D = foreground_learner(7, LearnConfig(chunk=4, context=2))
    record = Record()
    for position in range(10):  # a step at a time, as verification hands them over
        learner.add(record, torch.randn(1, F), [position + 1], position, torch.randn(1, D), torch.tensor([position + 2]),
                    torch.tensor([False]))
    learner.flush(record)
    labelled = [int(p) for e in learner.window for p, label in zip(e.positions, e.label) if label >= 0]
    assert sorted(labelled) == list(range(9))  # the last row has no successor to be scored against
    assert len(learner.window) > 1 and all(len(e.tokens) <= 4 + 2 for e in learner.window)

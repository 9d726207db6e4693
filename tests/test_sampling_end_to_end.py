"""Temperature, top-k and top-p through the whole decode loop: the first three sampled tokens must follow
the target's joint law, worked out here from the model's own forwards and an independent implementation
of the logits processing (conftest.reference_probs), not from forerun.sampling.

Drafts are two tokens long (fixed), so a step that accepts both also emits a bonus token: with three
tokens per trial, the third is often that bonus. A chain and a two-wide tree from a separate draft
model are covered; the same checks must reject a drafter that reports the wrong q, and samples compared
against an expectation with the wrong processing. The chi-square helpers are test_distribution's.
"""
import dataclasses
from typing import NamedTuple

import pytest
import torch

from conftest import random_eagle_head, reference_probs, small_vocab_runtime
from helpers_decoding import WatchedAuto
from helpers_distribution import assert_follows, target_logits
from forerun import LLM, SamplingParams, SpecConfig
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.eagle import Eagle
from forerun.drafters.medusa import Medusa
from forerun.heads.medusa import new_head
from forerun.types import Draft

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 8
PROMPT = [1, 4]  # two tokens: the prefill runs one forward, the first step verifies from position 1
PROCESSING = dict(temperature=0.7, top_k=5, top_p=0.9)
TRIALS = 2_000
CHAIN = SpecConfig(method="draft", tree_width=1, num_draft=2, max_draft=2, adaptive=False)
TREE = SpecConfig(method="draft", tree_width=2, num_draft=2, max_draft=2, adaptive=False)


# The chain's min_accept stops about half its chains after the first token (their paths' confidence times
# the head's top probability is below it): the stopping rule is under test too.
EAGLE_CHAIN = SpecConfig(method="eagle", tree_width=1, num_draft=2, max_draft=2, adaptive=False,
                         options={"min_accept": 0.25})
EAGLE_TREE = SpecConfig(method="eagle", tree_width=2, num_draft=2, max_draft=2, adaptive=False,
                        options={"min_accept": 0.05})


def eagle(target, spec, draft):
    """An EAGLE-3 head with random weights for the target (`draft` unused: a head drafts from the
    target's own features), its output scaled so that its drafts are often accepted."""
    head = random_eagle_head(target, seed=6, aux=(1, 2))
    with torch.no_grad():
        head.lm_head.weight.mul_(0.3)
    return Eagle(target, spec, head=head)


class EagleUniformQ(Eagle):
    """An EAGLE chain that reports uniform draws for tokens drawn from its head."""

    def propose_batch(self, seqs, depths):
        return [draft if draft.q is None else Draft(draft.tree, torch.full_like(draft.q, 1 / draft.q.shape[1]))
                for draft in super().propose_batch(seqs, depths)]


class EagleCutOnDrawn(Eagle):
    """An EAGLE chain that drops drawn tokens the head found unlikely (and the rest of the chain after
    them): a stopping rule that looks at the drawn token, so its drafts no longer follow the q it reports."""

    def propose_batch(self, seqs, depths):
        return [self.cut(seq, draft) for seq, draft in zip(seqs, super().propose_batch(seqs, depths))]

    def cut(self, seq, draft):
        if draft.q is None:
            return draft
        keep = 1
        while keep < draft.size and draft.q[keep, draft.tree.tokens[keep]] >= 0.5:
            keep += 1
        seq.draft_state.confidence = None
        return Draft(draft.tree.subtree(list(range(keep))), draft.q[:keep] if keep > 1 else None)


class UniformQ(DraftModel):
    """A drafter fed the wrong q: its tokens come from the draft model, its q rows claim uniform draws."""

    def propose(self, seq, depth):
        draft = super().propose(seq, depth)
        return Draft(draft.tree, torch.full_like(draft.q, 1 / draft.q.shape[1]))


def joint_of_three(logits: torch.Tensor, **processing) -> torch.Tensor:
    """[V, V, V]: p(x1) p(x2 | x1) p(x3 | x1, x2) under the given processing."""
    p = reference_probs(logits, **processing)  # [V, V, 3, V]
    return p[0, 0, 0][:, None, None] * p[:, 0, 1][:, :, None] * p[:, :, 2]


class World(NamedTuple):
    target: object  # Runtime
    draft: object  # Runtime
    logits: torch.Tensor  # [V, V, 3, V], from target_logits
    joint: torch.Tensor  # [V, V, V], the law of the first three tokens


@pytest.fixture(scope="module")
def world() -> World:
    target, draft = small_vocab_runtime(seed=4, head_scale=0.2), small_vocab_runtime(seed=5, head_scale=0.2)
    logits = target_logits(target, PROMPT)
    rows = logits.flatten(0, 2)
    t, k, top_p = PROCESSING["temperature"], PROCESSING["top_k"], PROCESSING["top_p"]
    # The processing must matter here, and be unambiguous: top-k and top-p each remove tokens the other
    # keeps somewhere, and no row sits so close to a cut that rounding could move a token across it.
    k_only, p_only = reference_probs(rows, t, top_k=k), reference_probs(rows, t, top_p=top_p)
    both = reference_probs(rows, **PROCESSING)
    assert ((k_only > 0) & (both == 0)).any() and ((p_only > 0) & (both == 0)).any()
    tempered = torch.softmax(rows.double() / t, -1).sort(-1, descending=True).values
    assert (tempered[:, k - 1] / tempered[:, k]).min() > 1 + 1e-4, "a near-tie at the top-k cut"
    head = tempered[:, :k] / tempered[:, :k].sum(-1, keepdim=True)
    assert (head.cumsum(-1) - top_p).abs().min() > 1e-4, "a row whose mass lands on the top-p cut"
    joint = joint_of_three(logits, **PROCESSING)
    assert joint.sum((1, 2)).max() < 0.9, "the target is too peaked for the test to mean anything"
    return World(target, draft, logits, joint)


def sample(world: World, spec: SpecConfig, drafter=DraftModel, trials: int = TRIALS):
    """(runs, triples [trials, 3]) from LLM.generate_ids with one seed per trial."""
    llm = LLM(runtime=world.target)
    llm.use_drafter(spec, drafter(world.target, spec, draft=world.draft))
    runs = [llm.generate_ids(PROMPT, SamplingParams(**PROCESSING, seed=trial, max_new_tokens=3, ignore_eos=True),
                             spec) for trial in range(trials)]
    return runs, torch.tensor([run.token_ids for run in runs])


@pytest.fixture(scope="module")
def chain_runs(world):
    return sample(world, CHAIN)


@pytest.mark.parametrize("spec", [CHAIN, TREE], ids=["chain", "tree-2-wide"])
def test_sampled_tokens_follow_the_processed_target(world, chain_runs, spec):
    runs, triples = chain_runs if spec is CHAIN else sample(world, spec)
    # Three tokens from one target forward: both drafts were accepted and the third is the bonus token.
    bonus = sum(run.stats.target_forwards == 1 for run in runs)
    assert bonus > TRIALS // 10, f"only {bonus} runs accepted both drafts: the bonus token was hardly tested"
    assert_follows(triples, world.joint, spec.method)


@pytest.mark.parametrize("processing", [dict(temperature=1.0, top_k=5, top_p=0.9),
                                        dict(temperature=0.7, top_k=5, top_p=1.0)],
                         ids=["temperature-ignored", "top-p-ignored"])
def test_negative_control_wrong_processing_is_rejected(world, chain_runs, processing):
    """The samples above, checked against what a loop that forgot one step of the processing would
    emit: the same checks must see the difference."""
    with pytest.raises(AssertionError, match="chi-square|probability 0"):
        assert_follows(chain_runs[1], joint_of_three(world.logits, **processing), "wrong processing")


def test_negative_control_wrong_q_is_rejected(world):
    """The chain drafter claiming uniform draws: verification accepts its tokens too often, and the
    emitted tokens drift towards the draft model's law."""
    _, triples = sample(world, CHAIN, drafter=UniformQ, trials=TRIALS // 3)
    with pytest.raises(AssertionError, match="chi-square|probability 0"):
        assert_follows(triples, world.joint, "uniform q")


@pytest.mark.parametrize("spec", [EAGLE_CHAIN, EAGLE_TREE], ids=["eagle-chain", "eagle-tree-2-wide"])
def test_eagle_samples_follow_the_processed_target(world, spec):
    """A head's chain (tokens drawn from its own processed distribution, Draft.q) and its tree (children
    chosen by confidence: point masses) through the whole loop. The head drafts from the second step
    on (the first one computes the prompt's features as it verifies the root), so tokens 2 and 3 are
    the drafted ones."""
    trials = TRIALS if spec is EAGLE_CHAIN else TRIALS // 2  # the tree shares the chain's head and verifier
    runs, triples = sample(world, spec, drafter=eagle, trials=trials)
    both = sum(run.stats.accept_histogram.get(3, 0) > 0 for run in runs)
    assert both > trials // 20, f"only {both} runs accepted both drafts: accepted drafts were hardly tested"
    if spec is EAGLE_CHAIN:
        stopped = sum(run.stats.draft_tokens < 2 * run.stats.drafts for run in runs)
        assert stopped > trials // 20, f"only {stopped} runs stopped a chain early: min_accept was hardly tested"
    assert_follows(triples, world.joint, spec.method)


def test_negative_control_eagle_cutting_on_the_drawn_token_is_rejected(world):
    spec = dataclasses.replace(EAGLE_CHAIN, options={"min_accept": 0.0})
    _, triples = sample(world, spec, drafter=lambda t, s, draft: EagleCutOnDrawn(t, s, head=eagle(t, s, draft).head),
                        trials=TRIALS // 3)
    with pytest.raises(AssertionError, match="chi-square|probability 0"):
        assert_follows(triples, world.joint, "eagle cutting on the drawn token")


def test_negative_control_eagle_claiming_uniform_q_is_rejected(world):
    _, triples = sample(world, EAGLE_CHAIN, drafter=lambda t, s, draft: EagleUniformQ(t, s, head=eagle(t, s, draft).head),
                        trials=TRIALS // 3)
    with pytest.raises(AssertionError, match="chi-square|probability 0"):
        assert_follows(triples, world.joint, "eagle claiming uniform q")


# min_accept cuts some node of nearly every tree here: the cut is under test too
MEDUSA_TREE = SpecConfig(method="medusa", tree_width=2, num_draft=2, max_draft=2, adaptive=False,
                         options={"min_accept": 0.1, "nodes": 4})


def test_medusa_tree_samples_follow_the_processed_target(world):
    """Medusa heads' tree (every node a point mass: each depth's candidates are its head's best tokens)
    through the whole loop. The heads are untrained as Medusa starts them (identity blocks, the target's
    LM head), so they draft the target's likeliest next tokens, often accepted here. They draft from the
    second step on, so tokens 2 and 3 are the drafted ones."""
    trials = TRIALS // 2
    runs, triples = sample(world, MEDUSA_TREE, trials=trials,
                           drafter=lambda t, s, draft: Medusa(t, s, head=new_head(t, 2, torch.arange(VOCAB))))
    both = sum(run.stats.accept_histogram.get(3, 0) > 0 for run in runs)
    assert both > trials // 20, f"only {both} runs accepted both drafts: accepted drafts were hardly tested"
    cut = sum(run.stats.draft_tokens < 4 * run.stats.drafts for run in runs)
    assert cut > trials // 20, f"only {cut} runs had a tree cut by min_accept: the cut was hardly tested"
    assert_follows(triples, world.joint, "medusa")


# weight 1: a sequence judges candidates by the last step scored, so the choice swings with the sampled text
AUTO = SpecConfig(method="auto", tree_width=2, num_draft=2, max_draft=2, adaptive=False,
                  options={"row_cost": 0.0, "timed": False, "weight": 1.0})


def test_auto_samples_follow_the_processed_target(world):
    """auto choosing between a head's chain (tokens drawn from its q) and Medusa's tree (point masses):
    which one drafts depends on how the earlier sampled tokens scored them, so the choice itself
    follows the sampled text, and the output must still follow the target."""
    made = []

    def build(target, spec, draft):
        eagle_spec = dataclasses.replace(EAGLE_CHAIN, options={"min_accept": 0.0})
        medusa_spec = dataclasses.replace(MEDUSA_TREE, options={"min_accept": 0.0, "nodes": 2})
        made.append(WatchedAuto(target, spec, candidates={
            "eagle": eagle(target, eagle_spec, draft),
            "medusa": Medusa(target, medusa_spec, head=new_head(target, 2, torch.arange(VOCAB)))}))
        return made[-1]

    trials = TRIALS // 2
    runs, triples = sample(world, AUTO, drafter=build, trials=trials)
    picked = {name: made[0].chosen.count(name) for name in ("eagle", "medusa")}
    assert min(picked.values()) > trials // 40, picked  # both candidates really drafted
    both = sum(run.stats.accept_histogram.get(3, 0) > 0 for run in runs)
    assert both > trials // 40, f"only {both} runs accepted both drafts: accepted drafts were hardly tested"
    assert_follows(triples, world.joint, "auto")

"""The goodput policy (SpecConfig.budget = "goodput"): its cost curve, its choice of
nodes within a draft and across the sequences of a batch, its depth plan for model drafters, and that
cutting trees keeps greedy output equal to `ar` and sampled output distributed as the target's."""
import dataclasses

import pytest
import torch
from conftest import tiny_runtime
from helpers_distribution import (E2E_PARAMS, E2E_PROMPT, E2E_VOCAB, assert_distributed_as, exact_first_two,
                                  flat_runtime)
from helpers_decoding import GREEDY, PROMPTS, datastore_for, generate, reference

from forerun import LLM, SamplingParams, SpecConfig
from forerun.backoff import Backoff
from forerun.engine.goodput import Drafting, Entry, Goodput, NodeOdds, RowCost, SpecOdds, best_cut, keep_nodes
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.rasd import RetrievalAugmented
from forerun.retrieval.datastore import build, fingerprint_of
from forerun.tree import Tree, TreeShape
from forerun.types import Draft, Extra

pytestmark = pytest.mark.usefixtures("single_thread")

# root; 1, 2 its children; 3, 4 children of 1; 5 child of 3
TREE = [-1, 0, 0, 1, 1, 3]


def tree_draft(parents=TREE, q=None, extra=None) -> Draft:
    return Draft(Tree(tokens=torch.arange(10, 10 + len(parents)), parents=list(parents)), q=q, extra=extra)


def test_cost_line_fits_and_stays_sane():
    cost = RowCost()
    cost.record(1, 0.010)
    assert cost.line() is None  # one row count is no line
    cost.record(5, 0.030)
    a, b = cost.line()
    assert a + b == pytest.approx(0.010) and a + 5 * b == pytest.approx(0.030)
    flat = RowCost()
    flat.record(1, 0.02), flat.record(40, 0.01)  # noise: wider measured faster
    a, b = flat.line()
    assert b == 0 and a > 0
    cost.record(5, 0.300)  # a slow first run of a new shape...
    assert cost.seconds[5] == pytest.approx(0.030)  # ...is outvoted: the low median of the last steps
    cost.record(5, 0.031), cost.record(5, 0.029)
    assert cost.seconds[5] == pytest.approx(0.030)
    a, b = cost.line()
    assert a + 5 * b == pytest.approx(0.030)


def linear(a, b):
    return lambda rows: a + b * rows


def best_size(odds, cost, extra_rows):
    """best_cut for one sequence's nodes (owner 0) after a root that is sure to emit one token."""
    return best_cut([(p, 0) for p in odds], 1.0, 1, {0: extra_rows}, cost)


def test_best_cut_trades_expected_tokens_against_rows():
    odds = [0.9, 0.5, 0.2, 0.05]
    assert best_size(odds, linear(1.0, 0.0), 0) == 4  # free rows: verify every node
    assert best_size(odds, linear(0.0, 1.0), 0) == 0  # rows cost all: a plain step
    # 1 + 0.25 * rows: k=1 -> 1.9/1.5, k=2 -> 2.4/1.75, k=3 -> 2.6/2.0 (best 1.371 at k=2)
    assert best_size(odds, linear(1.0, 0.25), 0) == 2
    assert best_size(odds, linear(1.0, 0.25), 20) == 0  # extra rows that ride along tip it to a plain step


def test_best_cut_across_a_batch_spends_rows_where_they_pay():
    """Two sequences' nodes merged best first: with 16 rows sure, each more row costs a 32nd of the
    step on this line, so only the likeliest nodes are worth it; on a flat one, all are."""
    nodes = [(0.9, 0), (0.8, 1), (0.3, 0), (0.1, 1)]
    steep = linear(8.0, 0.5)  # 16 rows: 16 s; k=1: 16.9/16.5, k=2: 17.7/17 (best), k=3: 18.0/17.5
    assert best_cut(nodes, 16.0, 16, {}, steep) == 2
    assert best_cut(nodes, 16.0, 16, {}, linear(1.0, 0.0)) == 4
    assert best_cut(nodes, 16.0, 16, {0: 30}, steep) == 0  # sequence 0's window would ride along


def test_cost_curve_interpolates_a_step_and_extrapolates_the_line():
    cost = RowCost()
    for rows, seconds in ((1, 0.010), (2, 0.0125), (8, 0.0124), (32, 0.0130)):  # a GPU-like step
        cost.record(rows, seconds)
    at = cost.curve()
    assert at(1) == 0.010 and at(2) == 0.0125
    assert at(8) == 0.0125  # never cheaper with more rows
    assert at(20) == pytest.approx(0.0125 + 0.0005 * 12 / 24)
    assert at(64) > at(32) == 0.0130
    odds = [0.5] + [0.004] * 30  # many unlikely nodes: cheap on the step, dear on a fitted line
    assert best_size(odds, at, 0) == 31
    a, b = cost.line()
    assert best_size(odds, linear(a, b), 0) < 31


def test_odds_per_context_once_trusted_and_optimistic_before():
    """A context (draft key, previous step) gets its own odds after TRUST visits; before that, no
    less than the unseen prior, so a promising context is tried rather than judged by the others."""
    odds = NodeOdds()
    chain = TreeShape([-1, 0])
    for _ in range(20):
        odds.record(chain, {0}, (1, "none"))  # 1-gram matches: never accepted
    for _ in range(3):
        odds.record(chain, {0, 1}, (3, "all"))
    assert odds.estimate(chain, (1, "none"))[1] == 0  # trusted: its own odds
    assert odds.estimate(chain, (3, "all"))[1] == 0.5  # untrusted: the prior
    assert 0 < odds.estimate(chain)[1] < 0.2  # over all contexts (a running mean)
    for _ in range(NodeOdds.TRUST):
        odds.record(chain, {0, 1}, (3, "all"))
    assert odds.estimate(chain, (3, "all"))[1] == 1.0


def test_odds_are_monotone_and_keyed_by_rank_paths():
    tree = TreeShape(TREE)
    assert tree.rank_paths == ((), (0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    odds = NodeOdds()
    for accepted in ({0, 1, 3}, {0, 1, 4}, {0, 2}, {0}):
        odds.record(tree, accepted)
    est = odds.estimate(tree)
    assert est[1] == pytest.approx(0.5) and est[2] == pytest.approx(0.25)
    assert est[3] == est[4] == pytest.approx(0.25)
    assert est[5] == 0  # never accepted
    # a later sibling that did better is capped by the earlier one, so a cut keeps draw order
    odds.record(tree, {0, 2}), odds.record(tree, {0, 2}), odds.record(tree, {0, 2})
    est = odds.estimate(tree)
    assert est[2] <= est[1]
    fresh = NodeOdds().estimate(tree)
    assert fresh[1] == 0.5 and fresh[3] == 0.25  # unseen: half the parent's odds


def test_keep_nodes_remaps_parents_q_and_extra_columns():
    q = torch.rand(len(TREE), 7)
    extra = Extra(tokens=torch.tensor([1, 2]), depths=torch.tensor([1, 2]),
                  mask=torch.rand(2, len(TREE) + 2) > 0.5)
    cut = keep_nodes(tree_draft(q=q, extra=extra), [0, 1, 3, 5])
    assert cut.tree.parents == [-1, 0, 1, 2]
    assert cut.tree.tokens.tolist() == [10, 11, 13, 15]
    assert torch.equal(cut.q, q[[0, 1, 3, 5]])
    assert torch.equal(cut.extra.mask, extra.mask[:, [0, 1, 3, 5, 6, 7]])
    plain = keep_nodes(tree_draft(extra=extra), [0])
    assert plain.size == 1 and plain.extra is None


SPEC = SpecConfig(method="recycle", budget="goodput")


def learned_policy(line=(1.0, 0.25)) -> Goodput:
    policy = Goodput()
    policy.cost.record(1, line[0] + line[1]), policy.cost.record(11, line[0] + 11 * line[1])
    memory = policy.memory(SPEC)
    memory.checks.recheck_at(10**9)  # no checks
    for accepted in ({0, 1, 3}, {0, 1}, {0, 1, 3, 5}, {0, 2}):
        memory.odds.record(TreeShape(TREE), accepted)
    return policy


def cut_one(policy: Goodput, draft: Draft, cuttable: bool = True, ratio: float = 1.0) -> Draft:
    return policy.cut([Entry(draft, policy.memory(SPEC), ratio, cuttable)], 1, 1.0)[0]


def test_cut_keeps_the_best_nodes_closed_under_parents():
    # odds: 1: 0.75, 2: 0.25, 3: 0.5, 4: 0, 5: 0.25 -> k=2 keeps {1, 3}: 2.25 / 1.75 beats 1.75 / 1.5
    cut = cut_one(learned_policy(), tree_draft())
    assert cut.tree.tokens.tolist() == [10, 11, 13] and cut.tree.parents == [-1, 0, 1]
    assert cut_one(learned_policy(line=(1.0, 0.0)), tree_draft()).size == len(TREE)
    assert cut_one(learned_policy(line=(0.0, 1.0)), tree_draft()).size == 1


def test_a_sequence_that_beats_the_odds_keeps_more():
    """accepted_ratio scales a sequence's odds: prompt lookup on a summary is not a chat."""
    assert cut_one(learned_policy(), tree_draft(), ratio=0.2).size == 1
    # ratio 2: odds 1: 1.0, 3: 1.0, 2: 0.5, 5: 0.5, 4: 0 -> k=4 (4.0 / 2.25) beats k=2 (3.0 / 1.75)
    assert cut_one(learned_policy(), tree_draft(), ratio=2.0).size == 5


def test_sampled_trees_are_verified_whole():
    """Whether a sampled node is verified must not depend on its own draw, so a tree with q is kept."""
    draft = tree_draft(q=torch.rand(len(TREE), 7))
    assert cut_one(learned_policy(), draft, cuttable=False) is draft
    assert cut_one(learned_policy(), draft, cuttable=True).size == 3  # greedy: any cut is exact


def test_checks_verify_one_whole_tree_less_and_less_often():
    policy = learned_policy()
    policy.memory(SPEC).checks = Backoff(SpecOdds.CHECK_EVERY, SpecOdds.CHECK_MAX)
    full = []
    for _ in range(200):  # two sequences of the same SpecConfig a step: a check keeps the first whole
        due = SPEC in policy.due_checks([SPEC])
        entries = [Entry(tree_draft(), policy.memory(SPEC), 1.0, True, checked=due and i == 0) for i in range(2)]
        full.append([d.size == len(TREE) for d in policy.cut(entries, 2, 2.0)])
    assert [i for i, f in enumerate(full, start=1) if any(f)] == [16, 48, 112]  # waits 16, 32, 64
    assert all(f == [True, False] for f in full if any(f))


def test_first_steps_measure_a_plain_step_then_the_tree():
    policy = Goodput()
    first = cut_one(policy, tree_draft())
    assert first.size == 1
    policy.record(1, 0.01)
    second = cut_one(policy, tree_draft())
    assert second.size == len(TREE)
    policy.record(len(TREE), 0.02)
    assert policy.cost.curve() is not None


def test_depths_for_model_drafters_fall_to_plain_under_load():
    """Before drafting: chains whose positions pay get depth, and a loaded step drafts nothing."""
    policy = learned_policy(line=(1.0, 0.05))
    chain_spec = SpecConfig(method="layer-skip", budget="goodput")
    odds = policy.memory(chain_spec).odds
    for accepted in [{0, 1, 2}] * 10 + [{0}]:  # the first two positions accepted 10 times in 11
        odds.record(TreeShape([-1, 0, 1, 2]), accepted, (None, "plain"))
    plain = Drafting(chain_spec, ratio=1.0, depth=3, checked=False, last_draft="plain", keyed=False)
    assert policy.depths([plain], 1, 1.0) == [2]  # the third position never pays
    policy.cost.record(64, 1.0 + 0.05 * 64)
    loaded = policy.depths([plain] * 2, 64, 64.0)
    assert loaded == [2, 2]  # odds near 1 still pay on this line...
    steep = learned_policy(line=(0.0, 1.0))
    steep.memory(chain_spec).odds = odds
    assert steep.depths([plain] * 2, 64, 64.0) == [0, 0]  # ...and nothing does on this one
    checked = dataclasses.replace(plain, checked=True)
    assert steep.depths([checked, plain], 64, 64.0) == [3, 0]  # but a check drafts its full depth


@pytest.fixture(scope="module")
def llm():
    return LLM(runtime=tiny_runtime("llama", seed=1))


@pytest.mark.parametrize("method", ["pld", "recycle", "stand", "lookahead", "retrieval", "layer-skip", "draft",
                                    "rasd", "del"])
@pytest.mark.parametrize("line", [(1.0, 0.15), None], ids=["steep", "measured"])
def test_cut_trees_match_ar(llm, tmp_path, monkeypatch, method, line):
    """With a fixed steep cost line most trees are cut to a few nodes (and some steps go plain); with
    the measured line whatever the machine says. Either way the output is `ar`'s, alone and batched."""
    sizes = []  # (size drafted, size verified), and (depth offered + 1, depth planned + 1) before drafting
    cut, depths = Goodput.cut, Goodput.depths

    def steep(policy):
        if line is not None:
            policy.cost.curve = lambda: lambda rows: line[0] + line[1] * rows

    def spy(self, entries, sure_rows, sure_tokens):
        steep(self)
        out = cut(self, entries, sure_rows, sure_tokens)
        sizes.extend((e.draft.size, d.size) for e, d in zip(entries, out))
        return out

    def spy_depths(self, chains, sure_rows, sure_tokens):
        steep(self)
        out = depths(self, chains, sure_rows, sure_tokens)
        sizes.extend((chain.depth + 1, 1) for chain, planned in zip(chains, out) if planned == 0)
        return out

    monkeypatch.setattr(Goodput, "cut", spy)
    monkeypatch.setattr(Goodput, "depths", spy_depths)
    options = {"datastore": datastore_for(llm, tmp_path)} if method in ("retrieval", "rasd") else {}
    spec = SpecConfig(method=method, budget="goodput", tree_width=2 if method in ("draft", "rasd") else 1,
                      options=options)
    if method in ("draft", "rasd"):
        drafter = {"draft": DraftModel, "rasd": RetrievalAugmented}[method]
        llm.use_drafter(spec, drafter(llm.runtime, spec, draft=llm.runtime))
    refs = [reference(llm, prompt) for prompt in PROMPTS]
    for prompt, ref in zip(PROMPTS, refs):
        assert generate(llm, prompt, spec).token_ids == ref
    batched = llm.generate_batch_ids(PROMPTS, GREEDY, spec)
    assert [b.token_ids for b in batched] == refs
    if line is None or method in ("layer-skip", "del"):  # their chains rarely reach a useful size here
        return
    if method != "lookahead":  # its n-grams are all right or all wrong here: whole trees or plain steps
        assert any(1 < after < before for before, after in sizes), "no tree was cut to a part"
    if method not in ("retrieval", "rasd", "draft"):  # these drafts are right so often their first guesses always pay
        assert any(after == 1 < before for before, after in sizes), "no step went plain"


@pytest.mark.parametrize("method", ["retrieval", "recycle"])
def test_cut_deterministic_drafts_sample_exactly(tmp_path, monkeypatch, method):
    """Deterministic drafts (q is None) are cut at temperature > 0 too; the first two tokens still
    follow the target's joint distribution."""
    target = flat_runtime(seed=3)
    monkeypatch.setattr(RowCost, "curve", lambda self: lambda rows: 1.0 + 0.3 * rows)
    sizes, cut = [], Goodput.cut

    def spy(self, entries, sure_rows, sure_tokens):
        out = cut(self, entries, sure_rows, sure_tokens)
        sizes.extend((e.draft.size, d.size) for e, d in zip(entries, out))
        return out

    monkeypatch.setattr(Goodput, "cut", spy)
    llm = LLM(runtime=target)
    build([[5, x, y] for x in range(E2E_VOCAB) for y in (1, 2)], fingerprint_of(target)).save(tmp_path / "ds")
    options = {"datastore": str(tmp_path / "ds"), "n_min": 1} if method == "retrieval" else {}
    spec = SpecConfig(method=method, budget="goodput", options=options)
    runs = [llm.generate_ids(E2E_PROMPT, SamplingParams(seed=t, **E2E_PARAMS), spec) for t in range(300)]
    assert any(after < before for before, after in sizes), "no draft was cut"
    pairs = torch.tensor([r.token_ids for r in runs])
    assert_distributed_as(pairs[:, 0] * E2E_VOCAB + pairs[:, 1], exact_first_two(target).flatten(),
                          f"{method} with budget=goodput")


def test_budget_is_validated():
    with pytest.raises(ValueError, match="budget must be"):
        SpecConfig(method="recycle", budget="auto")
    assert SpecConfig(budget="goodput").goodput and not SpecConfig(budget="fixed").goodput
    with pytest.raises(ValueError, match="budget"):
        SpecConfig(budget="cost")  # the policy's name before 0.1: not kept as an alias
    assert not SpecConfig().goodput

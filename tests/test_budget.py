"""The cost budget for draft trees (SpecConfig.budget = "cost"): its cost line, its choice of nodes, and
that cutting trees keeps greedy output equal to `ar` and sampled output distributed as the target's."""
import pytest
import torch
from conftest import tiny_runtime
from helpers_parity import single_thread  # noqa: F401  (a fixture)
from test_distribution import E2E_PARAMS, E2E_PROMPT, E2E_VOCAB, assert_distributed_as, exact_first_two, flat_runtime
from test_drafters_4b import datastore_for
from test_equivalence import PROMPTS, generate, reference

from forerun import LLM, SamplingParams, SpecConfig
from forerun.budget import NodeOdds, RowCost, TreeBudget, best_size, keep_nodes, rank_paths
from forerun.retrieval.datastore import build, fingerprint_of
from forerun.types import Draft, Extra, Verdict

pytestmark = pytest.mark.usefixtures("single_thread")

# root; 1, 2 its children; 3, 4 children of 1; 5 child of 3
TREE = [-1, 0, 0, 1, 1, 3]


def tree_draft(parents=TREE, q=None, extra=None) -> Draft:
    return Draft(tokens=torch.arange(10, 10 + len(parents)), parents=list(parents), q=q, extra=extra)


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


def test_best_size_trades_expected_tokens_against_rows():
    odds = [0.9, 0.5, 0.2, 0.05]
    assert best_size(odds, linear(1.0, 0.0), 0) == 4  # free rows: verify every node
    assert best_size(odds, linear(0.0, 1.0), 0) == 0  # rows cost all: a plain step
    # 1 + 0.25 * rows: k=1 -> 1.9/1.5, k=2 -> 2.4/1.75, k=3 -> 2.6/2.0 (best 1.371 at k=2)
    assert best_size(odds, linear(1.0, 0.25), 0) == 2
    assert best_size(odds, linear(1.0, 0.25), 20) == 0  # extra rows that ride along tip it to a plain step


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


def test_odds_are_monotone_and_keyed_by_rank_paths():
    paths = rank_paths(TREE)
    assert paths == [(), (0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    odds = NodeOdds()
    for accepted in ({0, 1, 3}, {0, 1, 4}, {0, 2}, {0}):
        odds.record(paths, accepted)
    est = odds.estimate(paths, TREE)
    assert est[1] == pytest.approx(0.5) and est[2] == pytest.approx(0.25)
    assert est[3] == est[4] == pytest.approx(0.25)
    assert est[5] == 0  # never accepted
    # a later sibling that did better is capped by the earlier one, so a cut keeps draw order
    odds.record(paths, {0, 2}), odds.record(paths, {0, 2}), odds.record(paths, {0, 2})
    est = odds.estimate(paths, TREE)
    assert est[2] <= est[1]
    fresh = NodeOdds().estimate(paths, TREE)
    assert fresh[1] == 0.5 and fresh[3] == 0.25  # unseen: half the parent's odds


def test_keep_nodes_remaps_parents_q_and_extra_columns():
    q = torch.rand(len(TREE), 7)
    extra = Extra(tokens=torch.tensor([1, 2]), depths=torch.tensor([1, 2]),
                  mask=torch.rand(2, len(TREE) + 2) > 0.5)
    cut = keep_nodes(tree_draft(q=q, extra=extra), [0, 1, 3, 5])
    assert cut.parents == [-1, 0, 1, 2]
    assert cut.tokens.tolist() == [10, 11, 13, 15]
    assert torch.equal(cut.q, q[[0, 1, 3, 5]])
    assert torch.equal(cut.extra.mask, extra.mask[:, [0, 1, 3, 5, 6, 7]])
    plain = keep_nodes(tree_draft(extra=extra), [0])
    assert plain.size == 1 and plain.extra is None


def learned_budget(line=(1.0, 0.25)) -> TreeBudget:
    budget = TreeBudget()
    budget.cost.record(1, line[0] + line[1]), budget.cost.record(11, line[0] + 11 * line[1])
    budget.steps, budget.next_check = 1, 10**9  # no checks
    for accepted in ({0, 1, 3}, {0, 1}, {0, 1, 3, 5}, {0, 2}):
        budget.odds.record(rank_paths(TREE), accepted)
    return budget


def test_cut_keeps_the_best_nodes_closed_under_parents():
    budget = learned_budget()
    # odds: 1: 0.75, 2: 0.25, 3: 0.5, 4: 0, 5: 0.25 -> k=2 keeps {1, 3}: 2.25 / 1.75 beats 1.75 / 1.5
    cut = budget.cut(tree_draft(), greedy=True)
    assert cut.tokens.tolist() == [10, 11, 13] and cut.parents == [-1, 0, 1]
    assert learned_budget(line=(1.0, 0.0)).cut(tree_draft(), greedy=True).size == len(TREE)
    assert learned_budget(line=(0.0, 1.0)).cut(tree_draft(), greedy=True).size == 1


def test_sampled_trees_are_verified_whole():
    """Whether a sampled node is verified must not depend on its own draw, so a tree with q is kept."""
    draft = tree_draft(q=torch.rand(len(TREE), 7))
    assert learned_budget().cut(draft, greedy=False) is draft
    assert learned_budget().cut(draft, greedy=True).size == 3  # greedy: any cut is exact


def test_checks_verify_the_full_tree_less_and_less_often():
    budget = learned_budget()
    budget.steps, budget.next_check = 0, TreeBudget.CHECK_EVERY
    full = []
    for _ in range(200):
        draft = budget.cut(tree_draft(), greedy=True)
        full.append(draft.size == len(TREE))
        budget.steps += 1
    assert [i for i, f in enumerate(full) if f] == [16, 32, 64, 128]


def test_first_steps_measure_a_plain_step_then_the_tree():
    budget = TreeBudget()
    verdict = Verdict(path=[0], next_token=1)
    first = budget.cut(tree_draft(), greedy=True)
    assert first.size == 1
    budget.record(first, verdict, 0.01)
    second = budget.cut(tree_draft(), greedy=True)
    assert second.size == len(TREE)
    budget.record(second, verdict, 0.02)
    assert budget.cost.line() is not None


@pytest.fixture(scope="module")
def llm():
    return LLM(runtime=tiny_runtime("llama", seed=1))


@pytest.mark.parametrize("method", ["pld", "recycle", "stand", "lookahead", "retrieval", "layer-skip"])
@pytest.mark.parametrize("line", [(1.0, 0.15), None], ids=["steep", "measured"])
def test_cut_trees_match_ar(llm, tmp_path, monkeypatch, method, line):
    """With a fixed steep cost line most trees are cut to a few nodes (and some steps go plain); with
    the measured line whatever the machine says. Either way the output is `ar`'s."""
    sizes = []
    cut = TreeBudget.cut

    def spy(self, draft, greedy):
        if line is not None:
            self.cost.curve = lambda: lambda rows: line[0] + line[1] * rows
        out = cut(self, draft, greedy)
        sizes.append((draft.size, out.size))
        return out

    monkeypatch.setattr(TreeBudget, "cut", spy)
    options = {"datastore": datastore_for(llm, tmp_path)} if method == "retrieval" else {}
    spec = SpecConfig(method=method, budget="cost", options=options)
    for prompt in PROMPTS:
        out = generate(llm, prompt, spec)
        assert out.token_ids == reference(llm, prompt)
    if line is None or method == "layer-skip":  # layer-skip's chains rarely reach a useful size here
        return
    assert any(1 < after < before for before, after in sizes), "no tree was cut to a part"
    if method != "retrieval":  # the datastore holds these answers: its first guesses pay every time
        assert any(after == 1 < before for before, after in sizes), "no step went plain"


@pytest.mark.parametrize("method", ["retrieval", "recycle"])
def test_cut_deterministic_drafts_sample_exactly(tmp_path, monkeypatch, method):
    """Deterministic drafts (q is None) are cut at temperature > 0 too; the first two tokens still
    follow the target's joint distribution."""
    target = flat_runtime(seed=3)
    monkeypatch.setattr(RowCost, "curve", lambda self: lambda rows: 1.0 + 0.3 * rows)
    sizes, cut = [], TreeBudget.cut

    def spy(self, draft, greedy):
        out = cut(self, draft, greedy)
        sizes.append((draft.size, out.size))
        return out

    monkeypatch.setattr(TreeBudget, "cut", spy)
    llm = LLM(runtime=target)
    build([[5, x, y] for x in range(E2E_VOCAB) for y in (1, 2)], fingerprint_of(target)).save(tmp_path / "ds")
    options = {"datastore": str(tmp_path / "ds"), "n_min": 1} if method == "retrieval" else {}
    spec = SpecConfig(method=method, budget="cost", options=options)
    runs = [llm.generate_ids(E2E_PROMPT, SamplingParams(seed=t, **E2E_PARAMS), spec) for t in range(300)]
    assert any(after < before for before, after in sizes), "no draft was cut"
    pairs = torch.tensor([r.token_ids for r in runs])
    assert_distributed_as(pairs[:, 0] * E2E_VOCAB + pairs[:, 1], exact_first_two(target).flatten(),
                          f"{method} with budget=cost")


def test_budget_is_validated():
    with pytest.raises(ValueError, match="budget must be"):
        SpecConfig(method="recycle", budget="auto")

"""The speculation stage drafts and verifies a step's sequences together: verify_batch on the flat
logits of a whole batch agrees with verifying each draft alone (greedy token for token, seeded
streams draw for draw), draws once per generator, and samples the target's distribution; drafters
with a model forward per token draft the batch in one forward per depth, as each sequence alone;
drafters see a sequence only through its view."""
import ast
from pathlib import Path

import pytest
import torch

from conftest import tiny_runtime
from helpers_decoding import PROMPTS
from helpers_distribution import (ROOT, TRIALS, Rng, assert_distributed_as, assert_first_two_match, bigram_world,
                                  chain, fixed_children, without_replacement)
from forerun import LLM, SamplingParams, SpecConfig
from forerun.drafters.base import Drafter, SequenceView, root_only
from forerun.tree import Tree
from forerun.types import Draft, Extra
from forerun.verify import verify_batch, verify_greedy, verify_stochastic

pytestmark = pytest.mark.usefixtures("single_thread")

V = 6
SAMPLED = SamplingParams(temperature=1.0)
GREEDY = SamplingParams()


def random_draft(g: torch.Generator, size: int, q: bool = False, extra: int = 0) -> Draft:
    """A random tree of `size` nodes, with q rows drawn at random and `extra` nodes riding along."""
    parents = [-1] + [int(torch.randint(0, i, (), generator=g)) for i in range(1, size)]
    tree = Tree(tokens=torch.randint(0, V, (size,), generator=g), parents=parents)
    rows = torch.softmax(torch.randn(size, V, generator=g), dim=-1) if q else None
    ride = None
    if extra:
        ride = Extra(tokens=torch.randint(0, V, (extra,), generator=g), depths=torch.ones(extra, dtype=torch.long),
                     mask=torch.ones(extra, size + extra, dtype=torch.bool))
    return Draft(tree, q=rows, extra=ride)


def batch_of(seed: int) -> list[Draft]:
    g = torch.Generator().manual_seed(seed)
    return [random_draft(g, 1), random_draft(g, 4), random_draft(g, 6, q=True), random_draft(g, 5, extra=3),
            random_draft(g, 3, q=True, extra=2), random_draft(g, 7)]


def rows_of(drafts: list[Draft]) -> list[slice]:
    starts = torch.tensor([0] + [d.rows for d in drafts]).cumsum(0).tolist()
    return [slice(a, a + d.rows) for a, d in zip(starts, drafts)]


def seeded(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("seed", range(5))
def test_a_batch_is_verified_as_each_draft_alone(seed):
    """Greedy drafts get verify_greedy's verdict and seeded sampled drafts verify_stochastic's with the
    same seed, whatever else shares the batch (extra rows included)."""
    drafts = batch_of(seed)
    logits = 3.0 * torch.randn(sum(d.rows for d in drafts), V, generator=torch.Generator().manual_seed(100 + seed))
    params = [GREEDY if b % 2 else SAMPLED for b in range(len(drafts))]
    generators = [None if p.greedy else g for p, g in zip(params, seeded(list(range(len(drafts)))))]
    verdicts = verify_batch(drafts, logits, params, generators)
    alone_generators = seeded(list(range(len(drafts))))
    for b, (draft, rows) in enumerate(zip(drafts, rows_of(drafts))):
        tree_logits = logits[rows][:draft.size]
        if params[b].greedy:
            alone = verify_greedy(draft, tree_logits)
        else:
            alone = verify_stochastic(draft, torch.softmax(tree_logits, dim=-1), alone_generators[b])
        assert (verdicts[b].path, verdicts[b].next_token) == (alone.path, alone.next_token)


def test_one_random_draw_per_generator(monkeypatch):
    """Eight sequences on one shared stream and two seeded ones: three draws for the whole batch,
    none for greedy sequences."""
    calls = []
    rand = torch.rand

    def counted(*args, **kwargs):
        calls.append(kwargs.get("generator"))
        return rand(*args, **kwargs)

    monkeypatch.setattr(torch, "rand", counted)
    g = torch.Generator().manual_seed(0)
    drafts = [random_draft(g, 5, q=b % 2 == 0) for b in range(12)]
    logits = torch.randn(sum(d.rows for d in drafts), V, generator=g)
    shared, own = torch.Generator().manual_seed(1), seeded([2, 3])
    generators = [shared] * 8 + own + [None, None]
    params = [SAMPLED] * 10 + [GREEDY] * 2
    verify_batch(drafts, logits, params, generators)
    assert len(calls) == 3 and set(map(id, calls)) == {id(shared), *map(id, own)}


def emit_pairs_batched(propose, P: torch.Tensor, Q: torch.Tensor, n: int, batch: int = 50, seed: int = 0,
                       q_seen=None) -> torch.Tensor:
    """n decodes of two tokens from ROOT, `batch` of them verified together each step through
    verify_batch, on one shared random stream; q_seen rewrites the drafts the verifier sees."""
    rng, logits_of = Rng(seed), torch.log(P)  # softmax(log P) = P at temperature 1
    out = []
    for _ in range(0, n, batch):
        emitted = [[] for _ in range(batch)]
        while any(len(e) < 2 for e in emitted):
            live = [b for b, e in enumerate(emitted) if len(e) < 2]
            drafts = [propose(emitted[b][-1] if emitted[b] else ROOT, Q, rng) for b in live]
            seen = [q_seen(d) if q_seen else d for d in drafts]
            logits = torch.cat([logits_of[d.tree.tokens] for d in drafts])
            for b, d, v in zip(live, drafts, verify_batch(seen, logits, [SAMPLED] * len(live), [rng.torch] * len(live))):
                emitted[b] += d.tree.tokens[v.path[1:]].tolist() + [v.next_token]
        out += [e[:2] for e in emitted]
    return torch.tensor(out[:n])


@pytest.mark.parametrize("propose", [chain(2), without_replacement(2, grandchildren=True), fixed_children([3, 1])],
                         ids=["chain-2", "without-replacement-2-deep", "fixed-children"])
def test_batched_verification_follows_the_target(propose):
    P, Q = bigram_world(V=V, seed=1)
    assert_first_two_match(emit_pairs_batched(propose, P, Q, TRIALS), P)


def test_negative_control_batched_verification_fed_a_wrong_q_fails():
    """Siblings drawn without replacement but verified as if drawn i.i.d. come out biased: the same
    check, on the batched verifier, must see it."""
    def claim_iid(draft: Draft) -> Draft:
        q = draft.q.clone()
        q[1:] = draft.q[1]
        return Draft(draft.tree, q)

    P, Q = bigram_world(V=V, seed=1)
    pairs = emit_pairs_batched(without_replacement(3), P, Q, TRIALS, q_seen=claim_iid)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_distributed_as(pairs[:, 0], P[ROOT], "first token")


class CountForwards:
    """Counts the forwards of a model (forward hook)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self.count)

    def count(self, *_):
        self.calls += 1


@pytest.mark.parametrize("spec", [
    SpecConfig(method="layer-skip", exit_layer=1),
    SpecConfig(method="del", num_draft=3, max_draft=3, options={"min_length": 3}),
], ids=["layer-skip", "del"])
def test_model_drafters_draft_a_batch_in_one_forward_per_depth(spec):
    """Four sequences drafting three tokens: three shallow forwards, and the drafts each sequence
    gets alone."""
    llm = LLM(runtime=tiny_runtime("llama", seed=1))
    drafter = llm.drafter(spec)
    params = SamplingParams(max_new_tokens=8)
    seqs = [llm.prefill(prompt, params, spec) for prompt in [*PROMPTS, list(range(5, 30))]]
    try:
        views = [seq.view for seq in seqs]
        forwards = CountForwards(llm.runtime.model)
        batched = drafter.propose_batch(views, [3, 3, 2, 3])
        assert forwards.calls == 3
        forwards.handle.remove()
        alone = [drafter.propose(view, depth) for view, depth in zip(views, [3, 3, 2, 3])]
        assert [d.tree.tokens.tolist() for d in batched] == [d.tree.tokens.tolist() for d in alone]
        assert [d.size for d in batched] == [4, 4, 3, 4]
    finally:
        for seq in seqs:
            llm.engine.release(seq)


class OneAtATime(Drafter):
    def propose(self, seq, depth):
        self.seen = getattr(self, "seen", []) + [(seq.root, depth)]
        return root_only(seq)


def test_the_default_propose_batch_drafts_each_sequence_alone():
    llm = LLM(runtime=tiny_runtime("llama", seed=1))
    drafter = OneAtATime(llm.runtime, SpecConfig())
    seqs = [llm.prefill(prompt, GREEDY, SpecConfig()) for prompt in PROMPTS]
    try:
        drafts = drafter.propose_batch([seq.view for seq in seqs], [1, 2, 3])
        assert drafter.seen == [(seq.root, d) for seq, d in zip(seqs, [1, 2, 3])]
        assert [d.tree.tokens.tolist() for d in drafts] == [[seq.root] for seq in seqs]
    finally:
        for seq in seqs:
            llm.engine.release(seq)


def test_a_view_reads_through_and_writes_only_draft_state():
    llm = LLM(runtime=tiny_runtime("llama", seed=1))
    seq = llm.prefill(PROMPTS[0], GREEDY, SpecConfig(method="pld"))
    try:
        view = seq.view
        assert view is seq.view and isinstance(view, SequenceView)
        assert (view.tokens, view.root, view.prompt_len, view.cached) == (seq.tokens, seq.root, seq.prompt_len,
                                                                            seq.cached)
        seq.tokens.append(3)
        assert view.root == 3  # always current
        view.draft_state = "mine"
        assert seq.draft_state == "mine"
        with pytest.raises(AttributeError):
            view.room = 5
        with pytest.raises(AttributeError):
            view.blocks  # noqa: B018 (not what a drafter may see)
        seq.tokens.pop()
    finally:
        llm.engine.release(seq)


def test_drafters_import_nothing_from_the_engine():
    """The engine imports drafters; a drafter sees sequences through SequenceView, never the engine."""
    drafters = Path(__file__).resolve().parent.parent / "forerun" / "drafters"
    for path in drafters.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(m.startswith("forerun.engine") for m in modules), f"{path.name} imports {modules}"

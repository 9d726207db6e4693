"""Each stochastic drafter's proposals, checked directly: recursive rejection sampling is exact only if
row i of Draft.q is the distribution node i was really drawn from, given the siblings drawn before it.

For every node, the row must be the drafter's proposal distribution at the node's parent (worked out
here: the draft model's or the shallow exit's processed distribution from a plain forward, or STAND's
stored distribution re-tempered) renormalised over the tokens its earlier siblings did not take, i.e.
siblings drawn without replacement. And the tokens must really be drawn that way: over many proposals,
the root's first two children (or a chain's first two tokens) follow the law those rows imply,
checked with test_distribution's chi-square. Each proposer also gets a negative control: rows that
claim i.i.d. siblings (or, for a chain, every node drawn from the first node's row) must fail the
first check, and the draws must fail the second when compared with the law of such rows.

Every direct call of a drafter goes through `propose` below, the one place to port when the drafter
interface changes.
"""
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from conftest import reference_probs, small_vocab_runtime
from helpers_distribution import assert_distributed_as
from forerun import LLM, SamplingParams, SpecConfig
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.rasd import RetrievalAugmented
from forerun.models.batch import ForwardBatch
from forerun.retrieval.datastore import build, fingerprint_of
from forerun.types import Draft

pytestmark = pytest.mark.usefixtures("single_thread")


def propose(llm: LLM, spec: SpecConfig, prompt: list[int], params: SamplingParams, depth: int) -> Draft:
    """A fresh request for `prompt`, and the drafter's first proposal for it, `depth` levels deep."""
    seq = llm.prefill(prompt, params, spec)
    try:
        return llm.drafter(spec).propose(seq, depth)
    finally:
        llm.engine.release(seq)


VOCAB = 8
PROMPT = [1, 4]
PROCESSING = dict(temperature=0.8, top_k=6, top_p=0.95)
ROW_PROPOSALS = 12  # proposals whose every row is checked
DRAWS = 1_200  # proposals whose first two tokens are counted


def params(seed: int) -> SamplingParams:
    return SamplingParams(**PROCESSING, seed=seed)


@dataclass
class Proposer:
    llm: LLM
    spec: SpecConfig
    proposal: Callable[[tuple[int, ...]], torch.Tensor]  # tokens after PROMPT -> [V] float64 law of the next
    siblings: bool  # the root gets several children (else a chain)
    point_masses: bool = False  # some nodes may be deterministic choices (one-hot rows)

    def draft(self, seed: int, depth: int) -> Draft:
        return propose(self.llm, self.spec, PROMPT, params(seed), depth)


def model_proposal(rt, **forward) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """The processed next-token law of `rt` after PROMPT + path, from one plain causal forward."""
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.inference_mode()
    def law(path: tuple[int, ...]) -> torch.Tensor:
        if path not in cache:
            tokens = torch.tensor(PROMPT + list(path))
            batch = ForwardBatch.contiguous(tokens, torch.arange(len(tokens)), 0)
            logits = rt.model(batch, rt.model.new_cache(len(tokens)), **forward).logits[-1].cpu()
            cache[path] = reference_probs(logits, **PROCESSING)
        return cache[path]
    return law


def stand_proposer(target) -> Proposer:
    """STAND with a memory that maps each last token to a stored top-4 distribution. Its proposal is
    that distribution raised to 1 / temperature and renormalised (it stores temperature-1 laws)."""
    spec = SpecConfig(method="stand", options={"nodes": 7, "depth": 2, "k": 4})
    llm = LLM(runtime=target)
    stored = torch.softmax(1.5 * torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(11)), -1)
    memory = llm.drafter(spec).memory  # the drafter's persistent memory, filled as its observations would
    laws = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for token in range(VOCAB):
        top = stored[token].topk(4)
        memory.update([token], top.indices.numpy(), top.values.double().numpy())
        laws[token, top.indices] = top.values.double() ** (1 / PROCESSING["temperature"])
    laws /= laws.sum(-1, keepdim=True)
    return Proposer(llm, spec, lambda path: laws[(PROMPT + list(path))[-1]], siblings=True)


@pytest.fixture(scope="module")
def proposers(tmp_path_factory) -> dict[str, Callable[[], Proposer]]:
    target, draft = small_vocab_runtime(seed=4, head_scale=0.2), small_vocab_runtime(seed=5, head_scale=0.2)
    store = tmp_path_factory.mktemp("datastore")
    # Continuations of the prompt, so retrieval adds deterministic nodes to RASD's tree.
    build([PROMPT + [x, (x + 3) % VOCAB] for x in range(VOCAB)], fingerprint_of(target)).save(store)

    def with_draft_model(spec, cls=DraftModel, **kw) -> Proposer:
        llm = LLM(runtime=target)
        llm.use_drafter(spec, cls(target, spec, draft=draft))
        return Proposer(llm, spec, model_proposal(draft), siblings=True, **kw)

    return {
        "draft-beam": lambda: with_draft_model(SpecConfig(method="draft", tree_width=2)),
        "draft-dynamic": lambda: with_draft_model(
            SpecConfig(method="draft", options={"tree": "dynamic", "nodes": 6, "branch": 3})),
        "rasd": lambda: with_draft_model(
            SpecConfig(method="rasd", tree_width=2,
                       options={"datastore": str(store), "n_min": 1, "retrieved_nodes": 4}),
            cls=RetrievalAugmented, point_masses=True),
        "stand": lambda: stand_proposer(target),
        "layer-skip": lambda: Proposer(LLM(runtime=target), SpecConfig(method="layer-skip", exit_layer=1),
                                       model_proposal(target, num_layers=1), siblings=False),
    }


# --- the checks ------------------------------------------------------------------------------------

def paths_of(draft: Draft) -> list[tuple[int, ...]]:
    """Each node's tokens after the root, the root's own path being ()."""
    tokens, out = draft.tree.tokens.tolist(), []
    for i, parent in enumerate(draft.tree.parents):
        out.append(() if parent < 0 else out[parent] + (tokens[i],))
    return out


def assert_rows_draw_without_replacement(draft: Draft, p: Proposer) -> None:
    """Row i of q is the proposal at i's parent without the tokens of i's earlier sampled siblings.
    Where p.point_masses, a node may instead be a deterministic choice (a one-hot row on its token),
    which must come after its parent's sampled children (they were drawn first)."""
    tokens, paths = draft.tree.tokens.tolist(), paths_of(draft)
    taken: dict[int, list[int]] = {}  # parent -> tokens of its sampled children so far
    chosen: set[int] = set()  # parents that already have a deterministic child
    for i in range(1, draft.size):
        parent, row = draft.tree.parents[i], draft.q[i].double()
        if p.point_masses and torch.equal(row, torch.nn.functional.one_hot(torch.tensor(tokens[i]), VOCAB).double()):
            chosen.add(parent)
            continue
        assert parent not in chosen, f"q row of node {i}: a sampled child after a deterministic sibling"
        expected = p.proposal(paths[parent]).clone()
        expected[taken.setdefault(parent, [])] = 0.0
        expected /= expected.sum()
        assert torch.allclose(row, expected, atol=1e-5), \
            f"q row of node {i} (parent {parent}, after {taken[parent]}): {row} is not {expected}"
        assert expected[tokens[i]] > 0, f"node {i} took token {tokens[i]}, which its row gives probability 0"
        taken[parent].append(tokens[i])


def claim_iid(draft: Draft) -> Draft:
    """The rows a drafter would report if it forgot that siblings exclude each other: each sibling
    gets the first sibling's row."""
    q, first = draft.q.clone(), {}
    for i, parent in enumerate(draft.tree.parents[1:], 1):
        q[i] = draft.q[first.setdefault(parent, i)]
    return Draft(draft.tree, q)


def claim_stale(draft: Draft) -> Draft:
    """The rows a chain drafter would report if it did not condition on what it drafted: every node
    gets the first node's row."""
    q = draft.q.clone()
    q[1:] = draft.q[1]
    return Draft(draft.tree, q)


def first_two(p: Proposer, draft: Draft) -> tuple[int, int]:
    """The root's first two children, or a chain's first two tokens."""
    tokens = draft.tree.tokens.tolist()
    if p.siblings:
        kids = draft.tree.children[0]
        return tokens[kids[0]], tokens[kids[1]]
    return tokens[1], tokens[2]


def law_of_first_two(p: Proposer, wrong: bool = False) -> torch.Tensor:
    """[V, V]: the law of first_two() implied by the proposal, or (wrong) by claim_iid's or
    claim_stale's rows."""
    first = p.proposal(())
    if wrong:
        return first[:, None] * first[None, :]
    if not p.siblings:
        return torch.stack([first[a] * p.proposal((a,)) if first[a] > 0 else torch.zeros(VOCAB, dtype=torch.float64)
                            for a in range(VOCAB)])
    rest = first[None, :].expand(VOCAB, -1).clone().fill_diagonal_(0.0)  # the second draw misses the first
    return first[:, None] * rest / rest.sum(-1, keepdim=True)


NAMES = ["draft-beam", "draft-dynamic", "rasd", "stand", "layer-skip"]


@pytest.mark.parametrize("name", NAMES)
def test_q_rows_are_the_proposal_without_earlier_siblings(proposers, name):
    p = proposers[name]()
    drafts = [p.draft(seed, depth=2) for seed in range(ROW_PROPOSALS)]
    assert all(d.q is not None for d in drafts)
    if p.siblings:
        assert max(len(d.tree.children[0]) for d in drafts) >= 2, "no siblings were drawn"
        assert any(max(d.tree.depths) >= 2 for d in drafts), "no second level was drawn"
    if p.point_masses:
        assert any(torch.equal(d.q[i], torch.nn.functional.one_hot(d.tree.tokens[i], VOCAB).to(d.q.dtype))
                   for d in drafts for i in range(1, d.size)), "no deterministic node was added"
    for d in drafts:
        assert_rows_draw_without_replacement(d, p)
    wrong = claim_iid if p.siblings else claim_stale
    with pytest.raises(AssertionError, match="q row"):
        for d in drafts:
            assert_rows_draw_without_replacement(wrong(d), p)


@pytest.mark.parametrize("name", NAMES)
def test_tokens_are_drawn_from_their_rows(proposers, name):
    """Every proposal's rows are checked as above, and the tokens drawn across proposals must follow
    the law those rows give them."""
    p = proposers[name]()
    drafts = [p.draft(seed, depth=1 if p.siblings else 2) for seed in range(DRAWS)]
    for d in drafts:
        assert_rows_draw_without_replacement(d, p)
    pairs = torch.tensor([first_two(p, d) for d in drafts])
    cells = pairs[:, 0] * VOCAB + pairs[:, 1]
    assert_distributed_as(pairs[:, 0], p.proposal(()), f"{name}: first token")
    assert_distributed_as(cells, law_of_first_two(p).flatten(), f"{name}: first two tokens")
    with pytest.raises(AssertionError, match="chi-square|probability 0"):
        assert_distributed_as(cells, law_of_first_two(p, wrong=True).flatten(), f"{name}: wrong rows' law")

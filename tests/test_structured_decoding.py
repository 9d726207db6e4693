"""Decoding under a grammar: greedy output of every method, with the grammar's forced tokens added to
its drafts, equals plain `ar` under the same grammar, token for token, alone and in a mixed batch; the
nodes a grammar rules out are cut before the forward; forced tokens are drafted and accepted; sampled
tokens follow the masked target's law (with forced-token drafts too), and the same check catches a
cut of sampled drafts."""
import dataclasses

import pytest
import torch
from llguidance.torch import fill_next_token_bitmask

from conftest import reference_probs, small_vocab_runtime, tiny_runtime
from helpers_decoding import PROMPTS, datastore_for, install_drafters, specs_for
from helpers_distribution import assert_distributed_as, assert_follows, target_logits
from helpers_structured import with_tokenizer
from test_engine import ENGINE, run_engine
from test_sampling_end_to_end import CHAIN, EAGLE_TREE, PROMPT, VOCAB, eagle
from forerun import LLM, SamplingParams, SpecConfig
from forerun.config import StructuredOutput
from forerun.drafters.ar import NoDrafter
from forerun.drafters.base import Drafter, chain
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.registry import methods
from forerun.engine import speculation
from forerun.engine.goodput import keep_nodes
from forerun.tree import Tree

pytestmark = pytest.mark.usefixtures("single_thread")

CONSTRAINTS = [
    StructuredOutput(json={"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8}, "tags": {"type": "array", "items": {"enum": ["ab", "cd", "ing"]}},
        "n": {"type": "integer"}}, "required": ["name", "tags", "n"]}),
    StructuredOutput(regex=r"([a-f]{2,4}-)+\d+"),
    StructuredOutput(choice=["true", "false", "null", "an error"]),
    StructuredOutput(grammar='root ::= item ("," item)*\nitem ::= [a-z]+ | "[" root "]"'),
    StructuredOutput(json_object=True),
]


def constrained(i: int, max_new: int = 30) -> SamplingParams:
    """Request i's params: the constraints in turn, and every sixth request unconstrained."""
    structured = None if i % 6 == 5 else CONSTRAINTS[i % 6]
    return SamplingParams(max_new_tokens=max_new, structured=structured)


PLAIN = SpecConfig(method="ar", forced_tokens=False)  # plain decoding: no draft at all


@pytest.fixture(scope="module")
def target():
    return with_tokenizer(tiny_runtime("llama", seed=1))


@pytest.fixture(scope="module")
def draft_runtime():
    return tiny_runtime("llama", seed=2, layers=2)


@pytest.mark.parametrize("method", methods())
def test_greedy_under_a_grammar_matches_ar_alone_and_batched(target, draft_runtime, tmp_path, method):
    llm = LLM(runtime=target, engine=ENGINE)
    specs = specs_for(method, datastore_for(llm, tmp_path))
    install_drafters(llm, specs, draft_runtime)
    prompts = [*PROMPTS, [5, 9, 5, 9, 5, 9, 5], list(range(20, 40)) * 2]
    requests = [(p, constrained(i, 20 + 3 * i), specs[i % 2]) for i, p in enumerate(prompts)]
    plain = [llm.generate_ids(p, params, PLAIN).token_ids for p, params, _ in requests]
    alone = [llm.generate_ids(p, params, spec).token_ids for p, params, spec in requests]
    assert alone == plain
    assert run_engine(llm.engine, requests) == plain
    tokenizer = target.tokenizer
    choice = tokenizer.decode(plain[2])
    assert choice in CONSTRAINTS[2].choice  # the grammar held, and its end ended the sample


class Outside(Drafter):
    """Drafts a chain of a token the character tokenizer does not have: no grammar allows it."""

    def propose(self, seq, depth):
        return chain(seq, [63] * depth)


def test_nodes_the_grammar_rules_out_are_cut_before_the_forward(target):
    llm = LLM(runtime=target)
    spec = SpecConfig(method="ar", num_draft=3, forced_tokens=False)
    llm.use_drafter(spec, Outside(target, spec))
    params = constrained(1)
    out = llm.generate_ids(PROMPTS[0], params, spec)
    assert out.token_ids == llm.generate_ids(PROMPTS[0], params, PLAIN).token_ids
    assert out.stats.drafts == 0 and out.stats.draft_tokens == 0  # every step verified its root alone
    free = llm.generate_ids(PROMPTS[0], dataclasses.replace(params, structured=None), spec)
    assert free.stats.draft_tokens > 0  # without a grammar the same drafts are verified


def test_forced_tokens_are_drafted_and_accepted(target):
    """Under a JSON schema the keys, their quotes and colons are forced: `ar` with forced tokens drafts
    them (nothing else), and the target accepts them, in fewer forwards than plain decoding."""
    params = constrained(0, 40)
    llm = LLM(runtime=target)
    plain = llm.generate_ids(PROMPTS[0], params, PLAIN)
    forced = llm.generate_ids(PROMPTS[0], params, SpecConfig(method="ar"))
    assert forced.token_ids == plain.token_ids
    assert plain.stats.draft_tokens == 0
    assert forced.stats.draft_tokens >= 4
    assert plain.stats.target_forwards - forced.stats.target_forwards >= 4
    goodput = llm.generate_ids(PROMPTS[0], params, SpecConfig(method="pld", budget="goodput"))
    assert goodput.token_ids == plain.token_ids  # the policy's odds learn from pld's nodes alone


def test_a_sample_ends_when_its_grammar_is_complete(target):
    llm = LLM(runtime=target)
    params = SamplingParams(max_new_tokens=50, ignore_eos=True, n=3, temperature=1.0, seed=0,
                            structured=StructuredOutput(choice=["abc", "de"]))
    out = llm.generate_ids(PROMPTS[1], params, SpecConfig(method="pld"))
    for sample in out.samples:
        assert target.tokenizer.decode(sample.token_ids) in ("abc", "de")
        assert sample.finish_reason == "stop"


# -- sampling -------------------------------------------------------------------------------------

# Each token's allowed set depends on the ones before it, and leaves out much of the vocabulary.
REGEX = StructuredOutput(regex="ab[ce]|ac[a-c]|ad[fg]|b[c-f][ab]|c[ag][d-g]")
PIECES = list("abcdefg")


# Forced tokens in some branches: after "b" the rest, after "c" or "d" one of two, after "a" none.
FORCED_REGEX = StructuredOutput(regex="a[b-d]e|bcd|c[a-g]f|dg[a-c]|e[fg][ab]")


def masks_of_three(grammar, regex: StructuredOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the grammar allows: first [V], second [V, V] (by x1), third [V, V, V] (by x1, x2)."""
    def allowed(prefix: list[int]) -> torch.Tensor:
        processor = grammar.processor(regex)
        if processor.matcher.try_consume_tokens(prefix) < len(prefix):
            return torch.zeros(VOCAB, dtype=torch.bool)
        bits = torch.zeros(1, processor.words, dtype=torch.int32)
        fill_next_token_bitmask(processor.matcher, bits, 0)
        return ((bits[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()[:VOCAB]

    first = allowed([])
    second = torch.stack([allowed([a]) for a in range(VOCAB)])
    third = torch.stack([torch.stack([allowed([a, b]) for b in range(VOCAB)]) for a in range(VOCAB)])
    return first, second, third


def masked_world(regex: StructuredOutput):
    """The tiny target with a character tokenizer, a draft model, and the law of the first three tokens
    masked by `regex` and not."""
    target = with_tokenizer(small_vocab_runtime(seed=4, head_scale=0.2), PIECES)
    draft = small_vocab_runtime(seed=5, head_scale=0.2)
    logits = target_logits(target, PROMPT)  # [V, V, 3, V]
    first, second, third = masks_of_three(LLM(runtime=target).engine.grammars, regex)
    masked = logits.clone()
    masked[:, :, 0] = masked[:, :, 0].masked_fill(~first, float("-inf"))
    masked[:, :, 1] = masked[:, :, 1].masked_fill(~second[:, None, :], float("-inf"))
    masked[:, :, 2] = masked[:, :, 2].masked_fill(~third, float("-inf"))
    return target, draft, joint(masked), joint(logits)


@pytest.fixture(scope="module")
def world():
    return masked_world(REGEX)


def joint(logits: torch.Tensor) -> torch.Tensor:
    """[V, V, V] law of the first three tokens; positions a grammar rules out get probability 0."""
    p = torch.nan_to_num(reference_probs(logits, temperature=1.0))
    return p[0, 0, 0][:, None, None] * p[:, 0, 1][:, :, None] * p[:, :, 2]


def sample(world, spec: SpecConfig, drafter, trials: int, regex: StructuredOutput = REGEX) -> torch.Tensor:
    target, draft = world[0], world[1]
    llm = LLM(runtime=target)
    llm.use_drafter(spec, drafter(target, spec, draft=draft))
    params = [SamplingParams(temperature=1.0, seed=t, max_new_tokens=3, structured=regex) for t in range(trials)]
    return torch.tensor([llm.generate_ids(PROMPT, p, spec).token_ids for p in params])


@pytest.fixture(scope="module")
def chain_triples(world):
    return sample(world, CHAIN, DraftModel, 1_500)


@pytest.mark.parametrize("spec", [CHAIN, EAGLE_TREE], ids=["sampled-chain", "deterministic-tree"])
def test_sampled_tokens_follow_the_masked_target(world, chain_triples, spec):
    """A chain drawn from a draft model (q given: nothing is cut) and an EAGLE tree of point masses
    (its nodes outside the grammar cut before the forward)."""
    triples = chain_triples if spec is CHAIN else sample(world, spec, eagle, 600)
    assert_follows(triples, world[2], spec.method)


def test_negative_control_the_unmasked_law_is_rejected(world, chain_triples):
    with pytest.raises(AssertionError, match="chi-square|probability 0"):
        assert_follows(chain_triples, world[3], "unmasked")


def test_negative_control_cutting_sampled_drafts_is_rejected(world, monkeypatch):
    """Cutting a sampled draft's ruled-out nodes skips their rejections, which would have moved the
    residual the next token is drawn from: the first token's law drifts from the masked target's."""
    def cut_everything(work, drafts):
        for i, draft in drafts.items():
            grammar = work[i].seq.processors.grammar
            keep = grammar.reachable(draft.tree)
            if len(keep) < draft.size:
                drafts[i] = keep_nodes(draft, keep)

    monkeypatch.setattr(speculation, "_cut_to_grammar", cut_everything)
    triples = sample(world, CHAIN, DraftModel, 600)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_distributed_as(triples[:, 0] * VOCAB + triples[:, 1], world[2].sum(2).flatten(), "cut sampled drafts")


# -- sampling with forced-token drafts ------------------------------------------------------------

FORCED_ALONE = SpecConfig(method="ar", num_draft=2, max_draft=2, adaptive=False)


def plain_drafter(target, spec, draft):
    return NoDrafter(target, spec)


@pytest.fixture(scope="module")
def forced_world():
    return masked_world(FORCED_REGEX)


@pytest.fixture(scope="module")
def forced_triples(forced_world):
    return sample(forced_world, FORCED_ALONE, plain_drafter, 1_000, FORCED_REGEX)


def test_forced_regex_forces_tokens(forced_world):
    """The check below is about forced drafts only if the grammar forces some: after "b", "cd"."""
    grammars = LLM(runtime=forced_world[0]).engine.grammars
    processor = grammars.processor(FORCED_REGEX)
    b = PIECES.index("b") + 1
    assert processor.forced(Tree(tokens=torch.tensor([0, b]), parents=[-1, 0]), 1, 5) == [b + 1, b + 2]
    assert processor.forced(Tree(tokens=torch.tensor([0]), parents=[-1]), 0, 5) == []


@pytest.mark.parametrize("spec", [FORCED_ALONE, EAGLE_TREE], ids=["forced-alone", "deterministic-tree-and-forced"])
def test_sampled_tokens_with_forced_drafts_follow_the_masked_target(forced_world, forced_triples, spec):
    """Forced tokens as the only drafts (after `ar`'s empty one), and hung below an EAGLE tree of point
    masses: a forced token is verified like any draft, so the law stays the masked target's."""
    triples = forced_triples if spec is FORCED_ALONE else sample(forced_world, spec, eagle, 600, FORCED_REGEX)
    assert_follows(triples, forced_world[2], f"{spec.method} with forced tokens")


def test_negative_control_forced_drafts_against_the_unmasked_law(forced_world, forced_triples):
    with pytest.raises(AssertionError, match="chi-square|probability 0"):
        assert_follows(forced_triples, forced_world[3], "unmasked, forced drafts")


def test_negative_control_forced_rows_left_unmasked_are_rejected(forced_world, monkeypatch):
    """Reusing the drafter's tree's walk for the grown tree, so the forced nodes' rows go unmasked (all
    tokens allowed): the token after a forced one is drawn from the unmasked law, and the check fails
    (or the grammar breaks at the commit)."""
    add_forced = speculation._add_forced

    def forced_rows_unmasked(work, drafts):
        before = dict(drafts)
        add_forced(work, drafts)
        for i, draft in drafts.items():
            if draft.forced:
                grammar = work[i].seq.processors.grammar
                bits = grammar._walk(before[i].tree)[0]
                ones = torch.full((draft.forced, bits.shape[1]), -1, dtype=torch.int32)
                grammar._walked = (draft.tree, torch.cat([bits, ones]), list(range(draft.size)))

    monkeypatch.setattr(speculation, "_add_forced", forced_rows_unmasked)
    with pytest.raises((AssertionError, RuntimeError), match="chi-square|probability 0|breaks the grammar"):
        triples = sample(forced_world, FORCED_ALONE, plain_drafter, 600, FORCED_REGEX)
        assert_follows(triples, forced_world[2], "forced rows unmasked")

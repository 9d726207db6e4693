"""Decoding under a grammar: greedy output of every method equals `ar` under the same grammar, token
for token, alone and in a mixed batch; the nodes a grammar rules out are cut before the forward;
sampled tokens follow the masked target's law, and the same check catches a cut of sampled drafts."""
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
from forerun.drafters.base import Drafter, chain
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.registry import methods
from forerun.engine import speculation
from forerun.engine.goodput import keep_nodes

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
    plain = [llm.generate_ids(p, params, SpecConfig(method="ar")).token_ids for p, params, _ in requests]
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
    spec = SpecConfig(method="ar", num_draft=3)
    llm.use_drafter(spec, Outside(target, spec))
    params = constrained(1)
    out = llm.generate_ids(PROMPTS[0], params, spec)
    assert out.token_ids == llm.generate_ids(PROMPTS[0], params, SpecConfig(method="ar")).token_ids
    assert out.stats.drafts == 0 and out.stats.draft_tokens == 0  # every step verified its root alone
    free = llm.generate_ids(PROMPTS[0], dataclasses.replace(params, structured=None), spec)
    assert free.stats.draft_tokens > 0  # without a grammar the same drafts are verified


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


def masks_of_three(grammar) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the grammar allows: first [V], second [V, V] (by x1), third [V, V, V] (by x1, x2)."""
    def allowed(prefix: list[int]) -> torch.Tensor:
        processor = grammar.processor(REGEX)
        if processor.matcher.try_consume_tokens(prefix) < len(prefix):
            return torch.zeros(VOCAB, dtype=torch.bool)
        bits = torch.zeros(1, processor.words, dtype=torch.int32)
        fill_next_token_bitmask(processor.matcher, bits, 0)
        return ((bits[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()[:VOCAB]

    first = allowed([])
    second = torch.stack([allowed([a]) for a in range(VOCAB)])
    third = torch.stack([torch.stack([allowed([a, b]) for b in range(VOCAB)]) for a in range(VOCAB)])
    return first, second, third


@pytest.fixture(scope="module")
def world():
    target = with_tokenizer(small_vocab_runtime(seed=4, head_scale=0.2), PIECES)
    draft = small_vocab_runtime(seed=5, head_scale=0.2)
    logits = target_logits(target, PROMPT)  # [V, V, 3, V]
    first, second, third = masks_of_three(LLM(runtime=target).engine.grammars)
    masked = logits.clone()
    masked[:, :, 0] = masked[:, :, 0].masked_fill(~first, float("-inf"))
    masked[:, :, 1] = masked[:, :, 1].masked_fill(~second[:, None, :], float("-inf"))
    masked[:, :, 2] = masked[:, :, 2].masked_fill(~third, float("-inf"))
    return target, draft, joint(masked), joint(logits)


def joint(logits: torch.Tensor) -> torch.Tensor:
    """[V, V, V] law of the first three tokens; positions a grammar rules out get probability 0."""
    p = torch.nan_to_num(reference_probs(logits, temperature=1.0))
    return p[0, 0, 0][:, None, None] * p[:, 0, 1][:, :, None] * p[:, :, 2]


def sample(world, spec: SpecConfig, drafter, trials: int) -> torch.Tensor:
    target, draft = world[0], world[1]
    llm = LLM(runtime=target)
    llm.use_drafter(spec, drafter(target, spec, draft=draft))
    params = [SamplingParams(temperature=1.0, seed=t, max_new_tokens=3, structured=REGEX) for t in range(trials)]
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

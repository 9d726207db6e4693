"""Sampling parameters that depend on the tokens before a position (presence, frequency and repetition
penalties, logit bias, min_tokens, bad words) and min_p, applied by forerun.logits_process to every draft
node from its own path: the unit behaviour of each processor on a small tree, greedy output equal to `ar`'s
with the same parameters for every registered method (alone and in a mixed batch), and sampled tokens
that follow the processed distribution (with negative controls)."""
from collections import Counter

import pytest
import torch

from conftest import StubTokenizer, small_vocab_runtime, tiny_runtime
from helpers_decoding import PROMPTS, datastore_for, install_drafters, specs_for
from helpers_distribution import assert_follows, target_logits
from forerun import LLM, SamplingParams, SpecConfig
from forerun.config import EngineConfig
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.registry import methods
from forerun.logits_process import Context, build
from forerun.models.runtime import Runtime
from forerun.tree import Tree

pytestmark = pytest.mark.usefixtures("single_thread")

V = 16
# root (committed) -> 3 -> 3 -> 9, and the root's second child 5: a node's row must see its own path only
TREE = Tree(tokens=torch.tensor([7, 3, 5, 3, 9]), parents=[-1, 0, 0, 1, 3])
PATHS = [[], [3], [5], [3, 3], [3, 3, 9]]  # each node's tokens below the root, the node included


def processed(params: SamplingParams, prompt=(1, 2), generated=(), logits=None, tokenizer=None):
    """(logits in, processed [N, V]) for TREE after `generated` tokens were committed."""
    procs = build(params, Context(tuple(prompt), V, frozenset({0}), tokenizer))
    if generated:
        procs.commit(list(generated))
    logits = torch.randn(TREE.size, V, generator=torch.Generator().manual_seed(0)) if logits is None else logits
    return logits, procs.apply(logits.clone(), TREE)


def penalised_by_hand(row: torch.Tensor, before: list[int], prompt, params: SamplingParams) -> torch.Tensor:
    """One row's penalties, token by token, apart from forerun's tensors: repetition over prompt and
    generated tokens, then frequency and presence over generated tokens."""
    out, counts = row.clone(), Counter(before)
    for t in range(len(row)):
        if params.repetition_penalty != 1 and (counts[t] or t in prompt):
            out[t] = out[t] / params.repetition_penalty if out[t] > 0 else out[t] * params.repetition_penalty
        out[t] -= params.frequency_penalty * counts[t] + params.presence_penalty * (counts[t] > 0)
    return out


@pytest.mark.parametrize("kw", [dict(frequency_penalty=0.7), dict(presence_penalty=-1.5),
                                dict(repetition_penalty=1.6),
                                dict(frequency_penalty=0.4, presence_penalty=1.0, repetition_penalty=0.7)], ids=str)
def test_penalties_count_each_nodes_own_path(kw):
    params, prompt, generated = SamplingParams(**kw), (1, 2, 3), (5, 6, 5)
    logits, out = processed(params, prompt, generated)
    for i, path in enumerate(PATHS):
        expected = penalised_by_hand(logits[i], list(generated) + path, prompt, params)
        torch.testing.assert_close(out[i], expected)
    assert not torch.equal(out[1], out[2]) or kw.get("repetition_penalty")  # siblings differ by their own tokens


def test_no_parameters_build_no_processors():
    assert build(SamplingParams(temperature=0.8, top_k=3, min_p=0.2), Context((1,), V, frozenset({0}))) is None


def test_logit_bias_adds_at_every_node():
    logits, out = processed(SamplingParams(logit_bias={4: 2.5, 11: -100}))
    torch.testing.assert_close(out[:, 4], logits[:, 4] + 2.5)
    torch.testing.assert_close(out[:, 11], logits[:, 11] - 100)
    torch.testing.assert_close(out[:, :4], logits[:, :4])


def test_min_tokens_masks_the_end_tokens_by_each_nodes_depth():
    params = SamplingParams(min_tokens=4, stop_token_ids=(6,))
    _, out = processed(params, generated=(8, 8))  # two generated: rows of depth 0 and 1 choose tokens 3 and 4
    early = torch.tensor([d < 2 for d in TREE.depths])
    for end in (0, 6):  # EOS (the context's) and the stop id
        assert torch.isinf(out[early, end]).all() and torch.isfinite(out[~early, end]).all()
    # ignore_eos and no stop ids: nothing to hold back, so no processor
    assert build(SamplingParams(min_tokens=4, ignore_eos=True), Context((1,), V, frozenset({0}))) is None


def test_bad_words_mask_the_last_token_after_the_rest_on_each_path():
    params = SamplingParams(bad_words=("3 9", "12", "5 3 3 2"))
    _, out = processed(params, generated=(5,), tokenizer=StubTokenizer())
    assert torch.isinf(out[:, 12]).all()  # a one-token word: everywhere
    banned = {i for i, path in enumerate(PATHS) if path[-1:] == [3]}  # "3 9": after a 3
    assert {i for i in range(TREE.size) if torch.isinf(out[i, 9])} == banned
    # "5 3 3 2": the generated 5, then the path 3 3 (node 3 only; node 4 has moved on)
    assert {i for i in range(TREE.size) if torch.isinf(out[i, 2])} == {3}


def test_a_fork_keeps_its_own_counts():
    procs = build(SamplingParams(frequency_penalty=1.0), Context((1,), V, frozenset()))
    twin = procs.fork()
    twin.commit([4, 4])
    logits = torch.zeros(TREE.size, V)
    assert procs.apply(logits.clone(), TREE)[0, 4] == 0 and twin.apply(logits.clone(), TREE)[0, 4] == -2


# --- greedy: every method equals ar with the same parameters ----------------------------------------

MAX_NEW = 24
PARAMETERS = {  # each changes the greedy output of the model below on some prompt (checked)
    "frequency": dict(frequency_penalty=1.5),
    "presence": dict(presence_penalty=2.0),
    "repetition": dict(repetition_penalty=1.8),
    "logit-bias": dict(logit_bias={22: 6.0, 57: -100.0}),
    "min-tokens": dict(min_tokens=12, stop_token_ids=(2,)),
    "bad-words": dict(bad_words=("57", "30 22")),
    "combined": dict(frequency_penalty=0.8, presence_penalty=0.5, repetition_penalty=1.3, logit_bias={22: 3.0},
                     min_tokens=6, stop_token_ids=(2,), bad_words=("31 17",)),
}
EQUIVALENCE_PROMPTS = [PROMPTS[0], PROMPTS[2]]


def greedy(name: str | None) -> SamplingParams:
    return SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, **PARAMETERS.get(name, {}))


@pytest.fixture(scope="module")
def target():
    """The tiny Llama of the equivalence tests, with a tokenizer that writes ids as numbers (for bad_words)."""
    model = tiny_runtime("llama", seed=1).model
    return Runtime(model=model, tokenizer=StubTokenizer(), name="tiny-llama-1-stub")


@pytest.fixture(scope="module")
def draft_runtime():
    return tiny_runtime("llama", seed=2, layers=2)


def test_each_parameter_changes_the_greedy_output(target):
    llm = LLM(runtime=target)
    for name in PARAMETERS:
        plain = [llm.generate_ids(p, greedy(None), SpecConfig()).token_ids for p in EQUIVALENCE_PROMPTS]
        with_it = [llm.generate_ids(p, greedy(name), SpecConfig()).token_ids for p in EQUIVALENCE_PROMPTS]
        assert with_it != plain, f"{name} leaves the output as it is: it would test nothing"


@pytest.mark.parametrize("method", methods())
def test_every_method_matches_ar_with_the_parameters(target, draft_runtime, tmp_path, method):
    """Alone, then in one batch: every parameter set with the method, plain requests with it, and the
    parameter sets with pld and ar beside them."""
    llm = LLM(runtime=target, engine=EngineConfig(max_step_tokens=24))
    spec = specs_for(method, datastore_for(llm, tmp_path))[1]
    install_drafters(llm, [spec], draft_runtime)
    reference = {(name, i): llm.generate_ids(p, greedy(name), SpecConfig()).token_ids
                 for name in [None, *PARAMETERS] for i, p in enumerate(EQUIVALENCE_PROMPTS)}
    for (name, i), expected in reference.items():
        assert llm.generate_ids(EQUIVALENCE_PROMPTS[i], greedy(name), spec).token_ids == expected, (name, i)
    batch = [(name, i, spec) for name in [None, *PARAMETERS] for i in range(len(EQUIVALENCE_PROMPTS))]
    batch += [(name, 1, other) for name in ("combined", "frequency") for other in (SpecConfig(method="pld"),
                                                                                   SpecConfig())]
    ids = [llm.engine.add_request(EQUIVALENCE_PROMPTS[i], greedy(name), s) for name, i, s in batch]
    done = {}
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out.generations[0].token_ids
    assert [done[r] for r in ids] == [reference[name, i] for name, i, _ in batch]


def test_seeded_sampling_with_the_parameters_does_not_depend_on_the_batch(target):
    """pld drafts deterministically, so a seeded sample with penalties, bias and min-p draws the same
    tokens alone and beside other sampled and greedy requests (its rows processed, theirs not)."""
    llm = LLM(runtime=target)
    sampled = [SamplingParams(temperature=0.9, seed=s, max_new_tokens=MAX_NEW, ignore_eos=True, min_p=0.05,
                              **PARAMETERS[name]) for s, name in enumerate(PARAMETERS)]
    requests = [(PROMPTS[i % 3], p) for i, p in enumerate(sampled)]
    requests += [(PROMPTS[0], greedy(None)), (PROMPTS[2], SamplingParams(temperature=0.9, seed=99))]
    spec = SpecConfig(method="pld")
    alone = [llm.generate_ids(prompt, params, spec).token_ids for prompt, params in requests]
    ids = [llm.engine.add_request(prompt, params, spec) for prompt, params in requests]
    done = {}
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out.generations[0].token_ids
    assert [done[r] for r in ids] == alone


# --- sampling: the processed distribution, through a drafted chain ----------------------------------

DIST_PROMPT = [1, 4]
DIST_TRIALS = 1_500
CHAIN = SpecConfig(method="draft", tree_width=1, num_draft=2, max_draft=2, adaptive=False)
TREE_2_WIDE = SpecConfig(method="draft", tree_width=2, num_draft=2, max_draft=2, adaptive=False)
PENALISED = dict(temperature=0.8, frequency_penalty=0.9, presence_penalty=0.6, repetition_penalty=1.5)
MIN_P = dict(temperature=0.8, min_p=0.2)


def joint_by_hand(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[V, V, V]: p(x1) p(x2 | x1) p(x3 | x1, x2) with the penalties from the tokens before each position,
    then temperature and min-p, worked out token by token apart from forerun.logits_process and sampling."""
    vocab = logits.shape[-1]

    def probs(row: torch.Tensor, before: list[int]) -> torch.Tensor:
        row = penalised_by_hand(row.double(), before, DIST_PROMPT, params)
        p = torch.softmax(row / params.temperature, -1)
        p = torch.where(p >= params.min_p * p.max(), p, 0.0)
        return p / p.sum()

    joint = torch.zeros(vocab, vocab, vocab, dtype=torch.float64)
    p1 = probs(logits[0, 0, 0], [])
    for x1 in range(vocab):
        p2 = probs(logits[x1, 0, 1], [x1])
        for x2 in range(vocab):
            joint[x1, x2] = p1[x1] * p2[x2] * probs(logits[x1, x2, 2], [x1, x2])
    return joint


@pytest.fixture(scope="module")
def sampling_world():
    """(target, draft model, the target's logits after the prompt and every x1, x2)."""
    target, draft = small_vocab_runtime(seed=4, head_scale=0.2), small_vocab_runtime(seed=5, head_scale=0.2)
    return target, draft, target_logits(target, DIST_PROMPT)


def sampled_triples(sampling_world, processing: dict, spec: SpecConfig) -> torch.Tensor:
    target, draft, _ = sampling_world
    llm = LLM(runtime=target)
    llm.use_drafter(spec, DraftModel(target, spec, draft=draft))
    runs = [llm.generate_ids(DIST_PROMPT, SamplingParams(**processing, seed=t, max_new_tokens=3, ignore_eos=True),
                             spec) for t in range(DIST_TRIALS)]
    assert sum(r.stats.target_forwards < 3 for r in runs) > DIST_TRIALS // 10, "drafts were hardly ever accepted"
    return torch.tensor([r.token_ids for r in runs])


@pytest.mark.parametrize("processing, without, spec", [
    (PENALISED, dict(temperature=0.8), CHAIN), (PENALISED, dict(temperature=0.8), TREE_2_WIDE),
    (MIN_P, dict(temperature=0.8), CHAIN)], ids=["penalties-chain", "penalties-tree-2-wide", "min-p-chain"])
def test_sampled_tokens_follow_the_processed_distribution(sampling_world, processing, without, spec):
    """Three tokens a trial through a drafted chain or tree (siblings penalised by their own tokens):
    they follow the joint law with the processing, and not the law without it (the negative control:
    the same checks see the difference)."""
    logits = sampling_world[2]
    joint, plain = joint_by_hand(logits, SamplingParams(**processing)), joint_by_hand(logits, SamplingParams(**without))
    assert (joint - plain).abs().max() > 0.02, "the processing hardly changes the law: it would test nothing"
    if "min_p" in processing:  # no token so close to the cut that rounding could move it across
        tempered = torch.softmax(logits.flatten(0, 2).double() / processing["temperature"], -1)
        ratio = tempered / tempered.max(-1, keepdim=True).values
        assert (ratio - processing["min_p"]).abs().min() > 1e-4
    triples = sampled_triples(sampling_world, processing, spec)
    assert_follows(triples, joint, str(processing))
    with pytest.raises(AssertionError, match="chi-square|probability 0"):
        assert_follows(triples, plain, "without the processing")


# --- validation, and the parameters that are not a processor ----------------------------------------

@pytest.mark.parametrize("kw, field", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-2.1), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logit_bias={3: 100.5}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(min_p=1.1), "min_p"), (dict(min_p=-0.1), "min_p"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=20, max_new_tokens=10), "min_tokens"),
    (dict(bad_words=("ok", "  ")), "bad_words"), (dict(n=3, best_of=2, temperature=1.0), "best_of"),
    (dict(best_of=2), "best_of"), (dict(max_tokens=5, max_new_tokens=7), "max_tokens"),
], ids=str)
def test_bad_values_are_rejected_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_max_tokens_is_max_new_tokens():
    assert SamplingParams(max_tokens=7) == SamplingParams(max_new_tokens=7) == SamplingParams(max_tokens=7,
                                                                                            max_new_tokens=7)
    assert SamplingParams(max_tokens=7).max_new_tokens == 7


def test_the_engine_checks_what_needs_the_model(target):
    llm = LLM(runtime=tiny_runtime("llama", seed=1))
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate_ids([1, 2], SamplingParams(logit_bias={V * 100: 1.0}), SpecConfig())
    with pytest.raises(ValueError, match="bad_words needs the model's tokenizer"):
        llm.generate_ids([1, 2], SamplingParams(bad_words=("x",)), SpecConfig())
    assert not llm.engine.has_unfinished()


def test_min_tokens_holds_back_stop_strings(target):
    """A stop string that ends within the first min_tokens tokens does not stop the sample; one after does."""
    llm = LLM(runtime=target)
    plain = llm.generate_ids(PROMPTS[0], greedy(None), SpecConfig()).token_ids
    stop = f" {plain[1]} {plain[2]}"  # the text of tokens 2 and 3 (StubTokenizer writes ids as numbers)
    assert ("".join(f" {t}" for t in plain)).count(stop) == 1
    early = llm.generate_ids(PROMPTS[0], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, stop=(stop,)),
                             SpecConfig(method="pld"))
    assert early.finish_reason == "stop" and early.token_ids == plain[:1]
    held = llm.generate_ids(PROMPTS[0], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, stop=(stop,),
                                                       min_tokens=3), SpecConfig(method="pld"))
    assert held.token_ids == plain and held.finish_reason == "length"


def test_best_of_keeps_the_likeliest_samples(target):
    llm = LLM(runtime=target)
    params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=8, ignore_eos=True, n=2, best_of=6)
    out = llm.generate_ids(PROMPTS[1], params, SpecConfig(method="pld"))
    assert len(out.samples) == 2
    scores = [s.cumulative_logprob for s in out.samples]
    for s in out.samples:
        assert s.cumulative_logprob == pytest.approx(sum(llm.score(PROMPTS[1], s.token_ids)), abs=1e-4)
    every = llm.generate_ids(PROMPTS[1], SamplingParams(temperature=1.0, seed=5, max_new_tokens=8, ignore_eos=True,
                                                        n=6), SpecConfig(method="pld"))
    # the same seeds draw the same six samples: best_of returns the two of them with the highest score
    ranked = sorted(every.samples, key=lambda s: -sum(llm.score(PROMPTS[1], s.token_ids)))
    assert [s.token_ids for s in out.samples] == [s.token_ids for s in ranked[:2]]
    assert scores[0] >= scores[1]

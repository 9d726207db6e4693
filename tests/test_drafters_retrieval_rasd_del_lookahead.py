"""Retrieval (REST), RASD, DEL and lookahead: greedy equivalence with `ar`, exact sampling, datastores."""
import json

import numpy as np
import pytest
import torch
from conftest import tiny_runtime
from helpers_distribution import (E2E_PARAMS, E2E_PROMPT, E2E_VOCAB, assert_distributed_as, exact_first_two,
                                  flat_runtime)
from helpers_decoding import GREEDY, PROMPTS, datastore_for, generate, reference

from forerun import LLM, SamplingParams, SpecConfig
from forerun.engine.draft_length import DraftLength, SpeedGuard
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.rasd import RetrievalAugmented
from forerun.retrieval.datastore import Datastore, build, fingerprint_of, suffix_array

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=["llama", "mistral"])
def llm(request):
    kw = {"sliding_window": 16} if request.param == "mistral" else {}
    return LLM(runtime=tiny_runtime(request.param, seed=1, **kw))


# --- datastore --------------------------------------------------------------------------------------

def test_suffix_array_sorts_suffixes():
    rng = np.random.default_rng(1)
    for tokens in (rng.integers(0, 3, 300), np.array([4, 4, 4, 4, -1, 4, 4]), np.array([7])):
        assert suffix_array(tokens).tolist() == sorted(range(len(tokens)), key=lambda i: tokens[i:].tolist())


def test_datastore_round_trip_and_lookup(tmp_path):
    build([[1, 2, 3, 4], [2, 3, 5], [9, 2, 3, 4, 7]], "fp").save(tmp_path / "ds")
    store = Datastore.load(tmp_path / "ds")
    assert store.longest_match([8, 2, 3], 4, 1)[0] == 2
    assert sorted(store.continuations([8, 2, 3], 4, 1, 10, 5)) == [[4], [4, 7], [5]]  # never past a document
    assert store.continuations([6, 6], 4, 1, 10, 5) == []


def test_mismatched_tokenizer_is_refused(tmp_path):
    build([[1, 2, 3]], "another-tokenizer", model="other").save(tmp_path / "ds")
    llm = LLM(runtime=tiny_runtime())
    spec = SpecConfig(method="retrieval", options={"datastore": str(tmp_path / "ds")})
    with pytest.raises(ValueError, match="was built with tokenizer another-tokenizer"):
        llm.generate_ids([1, 2], GREEDY, spec)
    with pytest.raises(ValueError, match="needs a datastore"):
        llm.generate_ids([1, 2], GREEDY, SpecConfig(method="retrieval"))
    with pytest.raises(FileNotFoundError, match="no datastore"):
        llm.generate_ids([1, 2], GREEDY, SpecConfig(method="retrieval", options={"datastore": str(tmp_path)}))


def test_cli_builds_with_the_models_tokenizer(tmp_path):
    import argparse

    from forerun.models.embedded import resolve_model_dir
    from forerun.models.tokenizer import Tokenizer
    from forerun.retrieval.cli import add_datastore_parser

    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Hello world"}) + "\n" + json.dumps({"q": ["x y", "z"]}) + "\n")
    parser = argparse.ArgumentParser()
    add_datastore_parser(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["datastore", "build", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                           "--out", str(tmp_path / "ds")])
    assert a.func(a) == 0
    store = Datastore.load(tmp_path / "ds")
    tok = Tokenizer.from_dir(resolve_model_dir(None))
    assert store.meta["documents"] == 3 and store.fingerprint == tok.fingerprint()
    assert store.continuations(tok.encode(" quick brown", add_bos=False), 4, 1, 4, 3)[0] == \
        tok.encode(" fox jumps over", add_bos=False)
    with pytest.raises(ValueError, match="was built with tokenizer"):
        store.check(fingerprint_of(tiny_runtime()), "tiny")


# --- greedy equivalence -----------------------------------------------------------------------------

def test_retrieval_matches_ar(llm, tmp_path):
    ds = datastore_for(llm, tmp_path)
    for options in ({"datastore": ds}, {"datastore": ds, "retrieved_nodes": 4, "depth": 3, "n_min": 1}):
        spec = SpecConfig(method="retrieval", options=options)
        for prompt in PROMPTS:
            out = generate(llm, prompt, spec)
            assert out.token_ids == reference(llm, prompt)
    hit = generate(llm, PROMPTS[0], SpecConfig(method="retrieval", options={"datastore": ds}))
    assert hit.stats.mean_accepted > 3  # the continuation is in the datastore


@pytest.mark.parametrize("same", [True, False])
def test_rasd_matches_ar(llm, tmp_path, same):
    ds = datastore_for(llm, tmp_path)
    arch = llm.runtime.model.args.arch
    kw = {"sliding_window": 16} if arch == "mistral" else {}
    draft = llm.runtime if same else tiny_runtime(arch, seed=2, layers=2, **kw)
    spec = SpecConfig(method="rasd", tree_width=2, num_draft=3, options={"datastore": ds, "retrieved_nodes": 8})
    for prompt in PROMPTS:
        out = generate(llm, prompt, spec, drafter=RetrievalAugmented(llm.runtime, spec, draft=draft))
        assert out.token_ids == reference(llm, prompt)


@pytest.mark.parametrize("options", [{}, {"layers": "1,3", "probe_every": 1, "min_length": 2}], ids=str)
def test_del_matches_ar(llm, options):
    spec = SpecConfig(method="del", options=options)
    for prompt in PROMPTS:
        assert generate(llm, prompt, spec).token_ids == reference(llm, prompt)
    drafter, trials = llm.drafter(spec), []
    observe = drafter.observe

    def spy(seq, draft, verdict, scores):
        observe(seq, draft, verdict, scores)
        trials.append(seq.draft_state.trials[drafter.layers[0]])

    drafter.observe = spy
    generate(llm, PROMPTS[2], spec)
    assert max(trials) > 2.0, "no shadow tokens were observed"


@pytest.mark.parametrize("options", [{}, {"window": 3, "ngram": 3, "candidates": 2, "pool_from_prompt": False}],
                         ids=str)
def test_lookahead_matches_ar(llm, options):
    spec = SpecConfig(method="lookahead", options=options)
    for prompt in PROMPTS:
        out = generate(llm, prompt, spec)
        assert out.token_ids == reference(llm, prompt)
        assert out.stats.new_tokens == GREEDY.max_new_tokens


def test_lookahead_window_learns_repetitive_text():
    """Without the prompt's n-grams, only the Jacobi window can find the loop the model falls into."""
    llm = LLM(runtime=tiny_runtime(seed=1))
    spec = SpecConfig(method="lookahead", options={"pool_from_prompt": False})
    prompt = [7, 7, 7, 2]
    params = SamplingParams(max_new_tokens=80, ignore_eos=True)
    out = llm.generate_ids(prompt, params, spec)
    assert out.token_ids == llm.generate_ids(prompt, params, SpecConfig(method="ar")).token_ids
    assert out.stats.mean_accepted > 1.3


# --- sampling ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target():
    return flat_runtime(seed=3)


def e2e_runs(llm, spec, trials=500):
    return [llm.generate_ids(E2E_PROMPT, SamplingParams(seed=t, **E2E_PARAMS), spec) for t in range(trials)]


@pytest.mark.parametrize("method", ["rasd", "del"])
def test_sampling_reproduces_target(target, tmp_path, method):
    llm = LLM(runtime=target)
    if method == "rasd":
        build([[5, x, y] for x in range(E2E_VOCAB) for y in (1, 2)], fingerprint_of(target)).save(tmp_path / "ds")
        spec = SpecConfig(method="rasd", num_draft=2, max_draft=2, adaptive=False,
                          options={"datastore": str(tmp_path / "ds"), "n_min": 1, "retrieved_nodes": 6})
        llm.use_drafter(spec, RetrievalAugmented(target, spec, draft=flat_runtime(seed=4)))
    else:
        spec = SpecConfig(method="del", num_draft=2, max_draft=2, options={"min_length": 2, "probe_every": 1})
    joint = exact_first_two(target)
    runs = e2e_runs(llm, spec)
    assert sum(r.stats.target_forwards for r in runs) < 1.9 * len(runs), "drafts were hardly ever accepted"
    pairs = torch.tensor([r.token_ids for r in runs])
    assert_distributed_as(pairs[:, 0] * E2E_VOCAB + pairs[:, 1], joint.flatten(), f"{method}: pair")


@pytest.mark.parametrize("method", ["retrieval", "lookahead"])
def test_deterministic_drafters_sample(target, tmp_path, method):
    """q = None (point masses) is exact by construction; this runs the sampling path end to end."""
    llm = LLM(runtime=target)
    build([[5, x, y] for x in range(E2E_VOCAB) for y in (1, 2)], fingerprint_of(target)).save(tmp_path / "ds")
    options = {"datastore": str(tmp_path / "ds"), "n_min": 1} if method == "retrieval" else {"ngram": 2}
    runs = e2e_runs(llm, SpecConfig(method=method, options=options), trials=300)
    if method == "retrieval":  # lookahead's pool is still empty two tokens after a one-token prompt
        assert sum(r.stats.target_forwards for r in runs) < 1.9 * len(runs)
    pairs = torch.tensor([r.token_ids for r in runs])
    assert_distributed_as(pairs[:, 0] * E2E_VOCAB + pairs[:, 1], exact_first_two(target).flatten(), method)


@pytest.mark.parametrize("method", ["pld", "layer-skip", "draft", "recycle", "stand", "retrieval", "rasd",
                                    "del", "lookahead"])
def test_guarded_steps_skip_the_drafter_without_changing_the_output(llm, tmp_path, monkeypatch, method):
    """The guard (SpecConfig.guard) turns some steps into plain ones without asking the drafter;
    every drafter must cope with the steps it did not draft. Here every other step is plain."""
    monkeypatch.setattr(SpeedGuard, "speculate", lambda self: self.steps % 2 == 1)
    options = {"datastore": datastore_for(llm, tmp_path)} if method in ("retrieval", "rasd") else {}
    spec = SpecConfig(method=method, guard=True, options=options)
    drafters = {"draft": DraftModel, "rasd": RetrievalAugmented}
    for prompt in PROMPTS:
        drafter = drafters[method](llm.runtime, spec, draft=llm.runtime) if method in drafters else None
        out = generate(llm, prompt, spec, drafter=drafter)
        assert out.token_ids == reference(llm, prompt)
        assert out.stats.accept_histogram[1] >= out.stats.target_forwards // 2  # the plain steps happened


def run_guard(guard: SpeedGuard, steps: int, spec_s: float, plain_s: float, tokens: int = 2) -> list[bool]:
    """Feed the guard `steps` steps at the given seconds per step; the kinds it chose, in order."""
    chosen = []
    for _ in range(steps):
        speculated = guard.speculate()
        chosen.append(speculated)
        guard.record(speculated, spec_s if speculated else plain_s, tokens if speculated else 1)
    return chosen


def test_guard_prefers_the_faster_kind_and_checks_less_often_while_it_holds():
    guard = SpeedGuard()
    chosen = run_guard(guard, 2, spec_s=0.08, plain_s=0.01)
    assert chosen == [True, False]  # measure speculation, then the plain baseline
    chosen = run_guard(guard, 1100, spec_s=0.08, plain_s=0.01)  # 40 ms a token against 10: plain
    checks = [i for i, c in enumerate(chosen, start=2) if c]
    gaps = [b - a for a, b in zip(checks, checks[1:])]
    assert gaps == sorted(gaps) and gaps[0] == 2 * SpeedGuard.CHECK_EVERY and max(gaps) == SpeedGuard.CHECK_MAX
    assert len(checks) < 10  # each check of a losing speculation doubles the wait
    # speculation becomes cheaper (2.5 ms a token): the next check overturns the choice
    chosen = run_guard(guard, SpeedGuard.CHECK_MAX + 20, spec_s=0.005, plain_s=0.01)
    switched = chosen.index(True)
    assert switched <= SpeedGuard.CHECK_MAX and chosen[switched:].count(False) <= 5  # then plain only to check


def test_guard_is_off_by_default_and_shared_across_requests_when_on(llm):
    assert DraftLength(SpecConfig()).value == SpecConfig().num_draft and DraftLength(SpecConfig()).guard is None
    spec = SpecConfig(method="pld", guard=True)
    generate(llm, PROMPTS[0], spec)
    guard = llm.engine.guards[spec]
    seen = guard.steps
    generate(llm, PROMPTS[0], spec)
    assert llm.engine.guards[spec] is guard and guard.steps > seen > 0

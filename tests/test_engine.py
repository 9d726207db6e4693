"""The batched engine: every method decodes each sequence of a mixed batch exactly as it decodes it
alone (greedy, float32 and q4), with sequences joining and finishing mid-batch; n samples from one
prefill; seeds that do not depend on the batch; streaming; abort."""
import pytest
import torch

from conftest import tiny_runtime
from helpers_distribution import E2E_PROMPT, E2E_VOCAB, assert_distributed_as, exact_first_two, flat_runtime
from helpers_decoding import PROMPTS, datastore_for, install_drafters, specs_for

from forerun import LLM, SamplingParams, SpecConfig
from forerun.config import EngineConfig
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.registry import methods
from forerun.engine.engine import Engine

pytestmark = pytest.mark.usefixtures("single_thread")

# Six prompts of different lengths (two of them longer than a step's token budget below, so their
# prompts go in over several chunks), each with its own token limit.
BATCH = [(PROMPTS[0], 40), (PROMPTS[1], 25), (PROMPTS[2], 33), (list(range(5, 60)) + [7, 7, 9], 30),
         ([9, 4, 9, 4, 9, 4, 1], 18), (list(range(60, 0, -1)) + PROMPTS[2], 37)]
ENGINE = EngineConfig(max_step_tokens=24, max_num_seqs=4)  # chunked prompts, and a queue
METHODS = methods()  # every registered drafter: a new one is checked batched against alone too


def greedy(max_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, ignore_eos=True)


class Forwards:
    """Wraps an engine's model to record what each forward held: (sequences, rows, sequences with
    both pending prompt tokens and decoding rows)."""

    def __init__(self, engine: Engine):
        self.model, self.seen = engine.model, []
        engine.model = self

    def __call__(self, batch, kv, **kw):
        self.seen.append((batch.sequences, batch.rows))
        return self.model(batch, kv, **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


def run_engine(engine: Engine, requests: list[tuple[list[int], SamplingParams, SpecConfig]], join_after: int = 3,
               ) -> list[list[int]]:
    """Half the requests first; the rest join after `join_after` steps. Token ids by request."""
    ids = [engine.add_request(p, params, spec) for p, params, spec in requests[: len(requests) // 2]]
    done, steps = {}, 0
    while engine.has_unfinished() or len(ids) < len(requests):
        if steps == join_after:
            ids += [engine.add_request(p, params, spec) for p, params, spec in requests[len(ids):]]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.generations[0].token_ids
        steps += 1
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def target(tiny_llama_each_format):
    return tiny_llama_each_format


@pytest.fixture(scope="module")
def draft_runtime():
    return tiny_runtime("llama", seed=2, layers=2)


@pytest.mark.parametrize("method", METHODS + ["goodput"])
def test_each_sequence_of_a_batch_decodes_as_it_does_alone(target, draft_runtime, tmp_path, method):
    llm = LLM(runtime=target, engine=ENGINE)
    datastore = datastore_for(llm, tmp_path)
    if method == "goodput":  # the policy over a tree drafter and a chain drafter together
        specs = [SpecConfig(method="recycle", budget="goodput"), SpecConfig(method="layer-skip", budget="goodput")]
    else:
        specs = specs_for(method, datastore)
    install_drafters(llm, specs, draft_runtime)
    requests = [(p, greedy(n), specs[i % 2]) for i, (p, n) in enumerate(BATCH)]
    alone = [llm.generate_ids(p, params, SpecConfig(method="ar")).token_ids for p, params, _ in requests]
    forwards = Forwards(llm.engine)
    batched = run_engine(llm.engine, requests)
    assert batched == alone
    assert [len(b) for b in batched] == [n for _, n in BATCH]
    assert max(n for n, _ in forwards.seen) == ENGINE.max_num_seqs  # a full batch, the rest queued
    assert llm.engine.pool.used == 0, "blocks still held after every request finished"


def test_a_batch_of_every_method_at_once(target, draft_runtime, tmp_path):
    llm = LLM(runtime=target, engine=EngineConfig(max_step_tokens=24))
    datastore = datastore_for(llm, tmp_path)
    specs = [specs_for(m, datastore)[1] for m in METHODS] + [SpecConfig(method="stand", budget="goodput")]
    install_drafters(llm, specs, draft_runtime)
    requests = [(BATCH[i % len(BATCH)][0], greedy(BATCH[i % len(BATCH)][1]), spec) for i, spec in enumerate(specs)]
    alone = [llm.generate_ids(p, params, SpecConfig(method="ar")).token_ids for p, params, _ in requests]
    assert run_engine(llm.engine, requests, join_after=5) == alone


def test_n_samples_share_one_prefill():
    llm = LLM(runtime=tiny_runtime("llama", seed=1))
    prompt = BATCH[3][0]
    out = llm.generate_batch_ids([prompt], SamplingParams(n=3, max_new_tokens=12, ignore_eos=True),
                                 SpecConfig(method="pld"))[0]
    assert len(out.samples) == 3 and out.samples[0] is not None
    alone = llm.generate_ids(prompt, greedy(12), SpecConfig(method="ar")).token_ids
    assert all(s.token_ids == alone for s in out.samples)  # greedy: three copies of one answer
    first, *others = [s.stats for s in out.samples]
    assert first.prefill_tokens + first.cached_tokens == len(prompt) - 1  # the prompt, computed once...
    assert all(s.prefill_tokens == 0 and s.cached_tokens == len(prompt) for s in others)  # ...and shared
    assert llm.engine.pool.used == 0


def test_n_samples_are_independent_draws():
    """Two samples of one prompt: their first tokens are independent, each from the target's law.
    The negative control (both samples drawing with the same seed) fails the same test."""
    target = flat_runtime(seed=3)
    p1 = exact_first_two(target).sum(1)  # the first token's law
    llm = LLM(runtime=target)
    params = [SamplingParams(temperature=1.0, max_new_tokens=1, seed=t, n=2) for t in range(1500)]
    rids = [llm.engine.add_request(E2E_PROMPT, p, SpecConfig(method="pld")) for p in params]
    done = {}
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out.generations
    firsts = torch.tensor([[g.token_ids[0] for g in done[r]] for r in rids])
    joint = (p1[:, None] * p1[None, :]).flatten()
    assert_distributed_as(firsts[:, 0] * E2E_VOCAB + firsts[:, 1], joint, "two samples of one prompt")
    assert (firsts[:, 0] == firsts[:, 1]).float().mean() < 0.9
    same_seed = torch.stack([firsts[:, 0], firsts[:, 0]], dim=1)  # what a shared random stream would give
    with pytest.raises(AssertionError, match="chi-square"):
        assert_distributed_as(same_seed[:, 0] * E2E_VOCAB + same_seed[:, 1], joint, "negative control")


@pytest.mark.parametrize("spec", [
    SpecConfig(method="layer-skip", num_draft=2, max_draft=2, adaptive=False),
    SpecConfig(method="draft", tree_width=2, num_draft=2, max_draft=2, adaptive=False),
], ids=["chain", "tree-2-wide"])
def test_batched_sampling_follows_the_target(spec):
    """Hundreds of seeded requests decoded together, 32 per forward, each drafting a chain (the
    target's first layers) or a two-wide tree (another model), verified by recursive rejection
    sampling: the first two tokens follow the target's joint law."""
    target = flat_runtime(seed=3)
    llm = LLM(runtime=target, engine=EngineConfig(max_num_seqs=32))
    if spec.method == "draft":
        llm.use_drafter(spec, DraftModel(target, spec, draft=flat_runtime(seed=4)))
    forwards = Forwards(llm.engine)
    rids = [llm.engine.add_request(E2E_PROMPT, SamplingParams(temperature=1.0, max_new_tokens=2, ignore_eos=True,
                                                              seed=t), spec) for t in range(1500)]
    done = {}
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out.generations[0]
    assert max(n for n, _ in forwards.seen) == 32
    assert sum(done[r].stats.target_forwards for r in rids) < 1.9 * len(rids), "drafts were hardly ever accepted"
    pairs = torch.tensor([done[r].token_ids for r in rids])
    assert_distributed_as(pairs[:, 0] * E2E_VOCAB + pairs[:, 1], exact_first_two(target).flatten(), spec.method)


@pytest.mark.parametrize("method", ["ar", "pld", "draft"])
def test_seeded_samples_do_not_depend_on_the_batch(draft_runtime, method):
    """A seeded request gives the same tokens alone and among other (unseeded) requests."""
    llm = LLM(runtime=tiny_runtime("llama", seed=1), engine=EngineConfig(max_step_tokens=16))
    spec = SpecConfig(method=method, num_draft=2, max_draft=2, adaptive=False)
    install_drafters(llm, [spec], draft_runtime)
    params = SamplingParams(temperature=0.8, top_k=20, seed=1234, n=3, max_new_tokens=20, ignore_eos=True)
    alone = llm.generate_batch_ids([BATCH[0][0]], params, spec)[0]
    others = [(p, SamplingParams(temperature=1.0, max_new_tokens=n, ignore_eos=True), spec) for p, n in BATCH[1:]]
    batched = run_engine(llm.engine, [(BATCH[0][0], params, spec)] + others, join_after=0)
    assert batched[0] == alone.token_ids
    again = llm.generate_batch_ids([BATCH[0][0]], params, spec)[0]
    assert [s.token_ids for s in again.samples] == [s.token_ids for s in alone.samples]
    assert len({tuple(s.token_ids) for s in alone.samples}) > 1, "the samples should differ"
    n1 = llm.generate_batch_ids([BATCH[0][0]], SamplingParams(temperature=0.8, top_k=20, seed=1234,
                                                               max_new_tokens=20, ignore_eos=True), spec)[0]
    assert n1.token_ids == alone.token_ids  # sample 0 of n draws from the seed itself


def test_streamed_text_and_ids_add_up(embedded_llm):
    llm = embedded_llm
    ids = llm.encode("Name three colors.")
    params = SamplingParams(max_new_tokens=24)
    pieces = []
    out = llm.generate_ids(ids, params, SpecConfig(method="pld"), on_text=pieces.append)
    assert "".join(pieces) == out.text and len(pieces) > 1
    rid = llm.engine.add_request(ids, params, SpecConfig(method="pld"), stream_text=True)
    text, tokens = [], []
    while llm.engine.has_unfinished():
        for o in llm.engine.step():
            for s in o.samples:
                text.append(s.text)
                tokens += s.token_ids
    assert "".join(text) == out.text and tokens == out.token_ids
    del rid


def test_abort_frees_the_request_at_once():
    llm = LLM(runtime=tiny_runtime("llama", seed=1))
    engine = llm.engine
    keep = engine.add_request(BATCH[0][0], greedy(30))
    drop = engine.add_request(BATCH[3][0], SamplingParams(n=3, max_new_tokens=30, ignore_eos=True))
    for _ in range(4):
        engine.step()
    held = engine.pool.used
    engine.abort(drop)
    assert engine.pool.used < held
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == keep
            if out.finished:
                finished[out.request_id] = out.generations[0].token_ids
    assert finished[keep] == llm.generate_ids(BATCH[0][0], greedy(30), SpecConfig()).token_ids
    assert engine.pool.used == 0
    engine.abort("no such request")  # ignored


def test_bad_requests_fail_at_once_and_leave_nothing_queued():
    llm = LLM(runtime=tiny_runtime("llama", seed=1), engine=EngineConfig(kv_cache_tokens=64, block_size=16))
    engine = llm.engine
    with pytest.raises(ValueError, match="the pool holds 64"):
        engine.add_request([1, 2, 3], greedy(100))
    with pytest.raises(ValueError, match="the pool holds 64"):
        engine.add_request([1, 2, 3], SamplingParams(n=4, max_new_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], greedy(4))
    with pytest.raises(ValueError, match="token ids must lie in"):
        engine.add_request([1, 64], greedy(4))
    with pytest.raises(ValueError, match="unknown method"):
        engine.add_request([1, 2], greedy(4), SpecConfig(method="nope"))
    rid = engine.add_request([1, 2, 3], greedy(4))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2, 3], greedy(4), request_id=rid)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
    assert list(engine.requests) == [rid]


@pytest.fixture(scope="module")
def embedded_llm():
    return LLM(quant="q4")

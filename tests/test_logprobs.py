"""Token log-probabilities of generated tokens, and LLM.score: both agree with one plain forward over
the whole text, whatever method decoded it, alone or in a batch, and follow stop and EOS cuts."""
import math

import pytest
import torch

from conftest import tiny_runtime
from helpers_decoding import PROMPTS

from forerun import LLM, SamplingParams, SpecConfig
from forerun.models.batch import ForwardBatch

pytestmark = pytest.mark.usefixtures("single_thread")


def full_logprobs(runtime, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: log-softmax of every row of one causal forward in a cache of its own."""
    model = runtime.model
    out = model(ForwardBatch.contiguous(torch.tensor(tokens), torch.arange(len(tokens)), 0),
                model.new_cache(len(tokens)))
    return torch.log_softmax(out.logits.float(), dim=-1)


@pytest.mark.parametrize("method", ["ar", "pld"])
def test_logprobs_match_one_forward_over_the_text(method):
    runtime = tiny_runtime(seed=3)
    llm = LLM(runtime=runtime)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, logprobs=3)
    outs = llm.generate_batch_ids([PROMPTS[0], PROMPTS[1]], params, SpecConfig(method=method))
    for prompt, out in zip([PROMPTS[0], PROMPTS[1]], outs):
        assert len(out.logprobs) == len(out.token_ids) == 20
        ref = full_logprobs(runtime, prompt + out.token_ids)[len(prompt) - 1:-1]
        for j, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            assert lp.token_id == tok
            assert lp.logprob == pytest.approx(ref[j, tok].item(), abs=1e-4)
            values, ids = ref[j].topk(3)
            assert [t for t, _ in lp.top] == ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
            assert lp.top[0][0] == tok  # greedy: the chosen token is the most likely one
        # score() of the same continuation gives the same numbers
        assert llm.score(prompt, out.token_ids) == pytest.approx([lp.logprob for lp in out.logprobs], abs=1e-4)


def test_logprobs_off_by_default_and_zero_means_the_chosen_token_only():
    llm = LLM(runtime=tiny_runtime(seed=3))
    plain = llm.generate_batch_ids([PROMPTS[2]], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert plain.logprobs is None
    chosen = llm.generate_batch_ids([PROMPTS[2]], SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=0))[0]
    assert [lp.top for lp in chosen.logprobs] == [()] * 6
    assert all(lp.logprob <= 0 for lp in chosen.logprobs)


def test_sampled_tokens_carry_the_models_raw_logprob():
    """At temperature 0.7 the reported number is the raw model's, not the tempered distribution's."""
    runtime = tiny_runtime(seed=3)
    llm = LLM(runtime=runtime)
    params = SamplingParams(temperature=0.7, top_k=5, seed=11, max_new_tokens=12, ignore_eos=True, logprobs=2)
    out = llm.generate_batch_ids([PROMPTS[0]], params, SpecConfig(method="pld"))[0]
    ref = full_logprobs(runtime, PROMPTS[0] + out.token_ids)[len(PROMPTS[0]) - 1:-1]
    got = [lp.logprob for lp in out.logprobs]
    assert got == pytest.approx([ref[j, t].item() for j, t in enumerate(out.token_ids)], abs=1e-4)


def test_n_samples_each_carry_their_own_logprobs():
    runtime = tiny_runtime(seed=3)
    llm = LLM(runtime=runtime)
    params = SamplingParams(temperature=1.0, seed=5, n=3, max_new_tokens=8, ignore_eos=True, logprobs=0)
    out = llm.generate_batch_ids([PROMPTS[1]], params)[0]
    for sample in out.samples:
        ref = full_logprobs(runtime, PROMPTS[1] + sample.token_ids)[len(PROMPTS[1]) - 1:-1]
        assert [lp.logprob for lp in sample.logprobs] == pytest.approx(
            [ref[j, t].item() for j, t in enumerate(sample.token_ids)], abs=1e-4)


def test_logprobs_follow_the_stop_and_eos_cuts():
    """On the embedded model (q4): a stop string and EOS cut the ids, and the logprobs with them."""
    llm = LLM(quant="q4")
    count = llm.encode("Count from 1 to 20, separated by commas.")
    out = llm.generate_ids(count, SamplingParams(max_new_tokens=64, stop=("5",), logprobs=1), SpecConfig(method="pld"))
    assert out.finish_reason == "stop" and "5" not in out.text
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    short = llm.encode("Say hi.")
    out = llm.generate_ids(short, SamplingParams(max_new_tokens=64, logprobs=0), SpecConfig(method="pld"))
    assert out.finish_reason == "eos" and len(out.logprobs) == len(out.token_ids)


def test_score_reuses_cached_blocks_and_checks_input():
    llm = LLM(runtime=tiny_runtime(seed=3))
    prompt = list(range(5, 60))
    cont = [7, 8, 9, 10]
    first = llm.score(prompt, cont)
    assert len(first) == 4 and all(x <= 0 and math.isfinite(x) for x in first)
    hits = llm.engine.pool.hit_blocks
    assert llm.score(prompt, cont) == pytest.approx(first, abs=1e-5)
    assert llm.engine.pool.hit_blocks > hits  # the prompt's full blocks came from the prefix cache
    assert llm.engine.pool.used == 0  # nothing held afterwards
    with pytest.raises(ValueError):
        llm.score(prompt, [])
    with pytest.raises(ValueError):
        llm.score([], cont)
    with pytest.raises(ValueError):
        llm.score(prompt, [10 ** 6])
    with pytest.raises(ValueError):
        SamplingParams(logprobs=21)


@pytest.mark.parametrize("chunk", [512, 7])
def test_prompt_logprobs_match_one_forward_in_any_chunking(monkeypatch, chunk):
    """An echo's logprobs: None for the first token, then every prompt token under the rows before it,
    with the top tokens; the same numbers whether the text runs in one forward or chunks of 7 rows,
    and whether its first blocks come from the prefix cache."""
    import forerun.engine.scheduler as scheduler_module
    monkeypatch.setattr(scheduler_module, "SCORE_CHUNK", chunk)
    runtime = tiny_runtime(seed=3)
    llm = LLM(runtime=runtime)
    prompt = list(range(5, 45))
    ref = full_logprobs(runtime, prompt)
    for _ in range(2):  # the second time its full blocks are cached
        got = llm.engine.prompt_logprobs(prompt, top=2)
        assert got[0] is None and len(got) == len(prompt)
        for j, e in enumerate(got[1:]):
            assert e.token_id == prompt[j + 1]
            assert e.logprob == pytest.approx(ref[j, prompt[j + 1]].item(), abs=1e-4)
            assert [t for t, _ in e.top] == ref[j].topk(2).indices.tolist()
    assert llm.engine.prompt_logprobs(prompt[:1]) == [None]
    assert llm.score(prompt[:30], prompt[30:]) == pytest.approx([ref[j - 1, prompt[j]].item() for j in range(30, 40)],
                                                               abs=1e-4)
    assert llm.engine.pool.used == 0


def test_scoring_a_text_the_pool_cannot_hold_now_is_busy_and_one_it_never_can_is_invalid():
    from forerun.config import EngineConfig
    from forerun.engine.kv_pool import PoolBusy
    llm = LLM(runtime=tiny_runtime(seed=3), engine=EngineConfig(kv_cache_tokens=128, max_draft_rows=16,
                                                                 prefix_caching=False))
    text = [(7 * i) % 60 + 3 for i in range(150)]
    held = llm.engine.prefilled(text[:60], SamplingParams(max_new_tokens=8), SpecConfig(method="ar"))
    with pytest.raises(PoolBusy, match="retry"):  # 8 blocks: 5 held, 4 needed: retry later
        llm.engine.prompt_logprobs(text[:64])
    llm.engine.release(held)
    assert len(llm.engine.prompt_logprobs(text[:64])) == 64
    with pytest.raises(ValueError, match="the pool holds 128") as e:
        llm.engine.prompt_logprobs(text)
    assert not isinstance(e.value, PoolBusy)


@pytest.mark.parametrize("method", ["ar", "pld"])
def test_a_score_runs_in_the_steps_of_the_requests_in_flight(method):
    """Scoring is scheduled like any other work: a request in flight keeps decoding in the steps that
    compute the scored text, loses none of its output (it comes with the next step()), and produces
    what it produces alone; the score equals one taken on an idle engine."""
    from forerun.config import EngineConfig
    runtime = tiny_runtime(seed=3)
    llm = LLM(runtime=runtime, engine=EngineConfig(max_step_tokens=8, prefix_caching=False))
    engine, text = llm.engine, list(range(5, 45))
    params, spec = SamplingParams(max_new_tokens=24, ignore_eos=True), SpecConfig(method=method)
    idle_score = llm.score(text[:10], text[10:])
    alone = llm.generate_batch_ids([PROMPTS[0]], params, spec)[0].token_ids

    rid = engine.add_request(PROMPTS[0], params, spec)
    tokens, finished = [], False
    for _ in range(3):
        for out in engine.step():
            tokens += [t for sample in out.samples for t in sample.token_ids]
    steps, first_after = engine.steps, True
    assert llm.score(text[:10], text[10:]) == pytest.approx(idle_score, abs=1e-5)
    assert engine.steps - steps == 6  # 39 rows computed, 7 a step beside the decoding row
    while not finished:
        for out in engine.step():
            assert out.request_id == rid
            if first_after:  # the first step after the score also hands out what was decoded meanwhile
                assert len(out.samples) > 1
                first_after = False
            tokens += [t for sample in out.samples for t in sample.token_ids]
            finished = out.finished
    assert tokens == alone and engine.pool.used == 0

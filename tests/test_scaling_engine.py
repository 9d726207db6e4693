"""Strategies on the engine with a tiny model: forks share the prompt's prefill, partial solutions
reuse cached blocks, one round is one batch, and a seeded run repeats."""
import dataclasses

import pytest
from conftest import StubTokenizer, tiny_runtime

from forerun import LLM
from forerun.config import EngineConfig
from forerun.scaling.answers import extract_answer
from forerun.scaling.generator import EngineGenerator
from forerun.scaling.strategies import Solver, build_strategy
from forerun.scaling.types import Branch, Query

PROMPT = Query("q", tuple(range(1, 41)))  # 40 tokens: two full 16-token blocks and 8 more


@pytest.fixture(scope="module")
def runtime():
    rt = tiny_runtime(seed=3)
    return dataclasses.replace(rt, tokenizer=StubTokenizer())


class ShortIsGood:
    """A scorer preferring short solutions: deterministic, so a search on the tiny model is repeatable."""

    name, needs_logprobs = "short", False

    def score(self, query, branches):
        return [-float(len(b.token_ids)) for b in branches]


def _generator(runtime, prefix_caching=True, **kw):
    llm = LLM(runtime=runtime, engine=EngineConfig(kv_cache_tokens=4096, prefix_caching=prefix_caching))
    return EngineGenerator(llm, temperature=1.0, max_new_tokens=kw.pop("max_new_tokens", 8), seed=5, **kw)


def test_n_samples_prefill_the_prompt_once(runtime):
    gen = _generator(runtime)
    out = build_strategy("sample").run(Solver(gen, extract_answer), PROMPT, 8)
    a = gen.account
    assert len(out.candidates) == 8 and a.requests == 1
    assert a.prefill_tokens == 40 - 1  # computed once (the last token is the first decode row); forks share it
    assert a.cached_tokens == 7 * 40
    assert a.generated_tokens == 8 * 8
    assert a.target_forwards == 8 * 8  # every sample: one plain forward per token
    assert a.engine_steps <= 1 + 8  # the prompt's step, then the 8 samples decode together


def test_independent_requests_prefill_it_every_time(runtime):
    gen = _generator(runtime, prefix_caching=False)
    gen.extend(PROMPT, [(Branch(), 1)] * 8, None)
    assert gen.account.prefill_tokens == 8 * (40 - 1) and gen.account.cached_tokens == 0


def test_extending_a_partial_solution_reuses_the_cached_prompt_blocks(runtime):
    gen = _generator(runtime)
    first = gen.extend(PROMPT, [(Branch(), 1)], None)[0][0]
    before = gen.account.copy()
    gen.extend(PROMPT, [(first, 2)], None)
    spent = gen.account.minus(before)
    # prompt + 8 generated = 48 tokens: the 2 full blocks of the prompt come from the prefix cache,
    # the rest but the last token (the first decode row) is computed once, and the fork shares all 48
    assert spent.prefill_tokens == 48 - 32 - 1
    assert spent.cached_tokens == 32 + 48


def test_a_beam_round_is_one_batch_and_a_seeded_run_repeats(runtime):
    runs = []
    for _ in range(2):
        gen = _generator(runtime, max_new_tokens=6)
        calls = []
        extend = gen.extend
        gen.extend = lambda q, reqs, stop, m=None: calls.append(len(reqs)) or extend(q, reqs, stop, m)
        solver = Solver(gen, extract_answer, ShortIsGood(), delimiter="9", max_steps=3)
        out = build_strategy("beam", width=2).run(solver, PROMPT, 4)
        runs.append(([c.text for c in out.candidates], out.chosen.text, calls))
        assert out.chosen is not None and all(n <= 2 for n in calls)
    assert runs[0] == runs[1]


def test_a_questions_samples_do_not_depend_on_what_ran_before(runtime):
    other = Query("other", tuple(range(5, 30)))
    alone = _generator(runtime).extend(PROMPT, [(Branch(), 3)], None)[0]
    gen = _generator(runtime)
    gen.extend(other, [(Branch(), 2)], None)
    after = gen.extend(PROMPT, [(Branch(), 3)], None)[0]
    assert [b.token_ids for b in after] == [b.token_ids for b in alone]
    again = gen.extend(PROMPT, [(Branch(), 3)], None)[0]  # a second call for the question draws anew
    assert [b.token_ids for b in again] != [b.token_ids for b in alone]


def test_keep_false_decodes_a_repeated_request_again(runtime):
    """forerun scale keeps samples for an identical later request (replayed, not decoded); a timed
    comparison (the its_hub peer) turns that off and pays for every sample, which come out the same."""
    runs = {}
    for keep in (True, False):
        gen = _generator(runtime, keep=keep, chat=False)
        first = gen.extend(gen.query("1 2 3 4 5 6"), [(Branch(), 3)], None)[0]
        again = gen.extend(gen.query("1 2 3 4 5 6"), [(Branch(), 3)], None)[0]  # query() restarts the count
        assert [b.token_ids for b in again] == [b.token_ids for b in first]
        runs[keep] = gen.account
    assert runs[True].replayed == 3 and runs[True].requests == 1
    assert runs[False].replayed == 0 and runs[False].requests == 2

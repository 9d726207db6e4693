"""Scaling on the embedded SmolLM2-135M with its real tokenizer and chat template: step delimiters
keep ids and text in agreement, a beam round is one engine batch, P(True) is a probability, and the
account of a vote matches its candidates."""
import math

import pytest

from forerun import LLM
from forerun.scaling.generator import EngineGenerator
from forerun.scaling.model import ModelScore
from forerun.scaling.run import solve
from forerun.scaling.scorers import PTrue, ReverseLikelihood
from forerun.scaling.strategies import Solver, build_strategy
from forerun.scaling.tasks import arithmetic
from forerun.scaling.types import ROOT, Account, Branch, Query

QUESTION = arithmetic(1, seed=0).problems()[0].question


@pytest.fixture(scope="module")
def llm():
    return LLM()


def test_vote_account_matches_its_candidates(llm):
    task = arithmetic(1, seed=0)
    gen = EngineGenerator(llm, temperature=0.8, max_new_tokens=16, seed=0)
    out = solve(build_strategy("vote"), Solver(gen, task.answer_of), QUESTION, 4)
    prompt = len(gen.query(QUESTION).prompt_ids)
    a = out.account
    assert len(out.candidates) == 4 and a.requests == 1
    assert a.generated_tokens == sum(c.tokens for c in out.candidates)
    assert a.prefill_tokens <= prompt - 1 and a.prefill_tokens + a.cached_tokens == 4 * prompt - 1


def test_steps_keep_ids_and_text_in_agreement_and_a_round_is_one_batch(llm):
    gen = EngineGenerator(llm, temperature=0.8, max_new_tokens=12, seed=1)
    query = gen.query(QUESTION)
    for b in gen.extend(query, [(ROOT, 2)], "\n")[0]:
        assert llm.tokenizer.decode(list(b.token_ids)) == b.text
        assert b.finished or b.text.endswith("\n")
    rounds = []
    extend = gen.extend
    gen.extend = lambda q, reqs, stop, m=None: rounds.append(len(reqs)) or extend(q, reqs, stop, m)
    solver = Solver(gen, arithmetic(1).answer_of, PTrue(ModelScore(llm, gen.account)), delimiter="\n", max_steps=2)
    out = solve(build_strategy("beam", width=2), solver, QUESTION, 2)
    assert rounds[0] == 1 and all(r <= 2 for r in rounds)  # each round: one call, one request per beam
    assert out.account.score_forwards > 0 and out.account.score_forwards % 2 == 0  # (A) and (B) per branch
    assert all(c.score <= 0 for c in out.candidates)


def test_ptrue_and_reverse_on_the_model(llm):
    model = ModelScore(llm, Account())
    query = Query("What is 2 + 3?", ())
    p = [math.exp(s) for s in PTrue(model).score(query, [Branch(text="5"), Branch(text="The answer is 9.")])]
    assert all(0 < x < 1 for x in p)
    reverse = ReverseLikelihood(model).score(query, [Branch(text="2 + 3 = 5")])[0]
    assert reverse < 0 and math.isfinite(reverse)

"""Scorers: token log-probabilities from generation agree with LLM.score, P(True) and the
time-reversed likelihood read the right tokens, and a local HF reward model scores (question, answer)."""
import dataclasses
import math

import pytest
import torch
from conftest import StubTokenizer, tiny_runtime

from forerun import LLM
from forerun.config import EngineConfig
from forerun.scaling.generator import EngineGenerator
from forerun.scaling.model import ModelScore
from forerun.scaling.scorers import PTRUE_REPLY, PTrue, ReverseLikelihood, TokenLogprob, build_scorer
from forerun.scaling.types import Account, Branch, Query


@pytest.fixture(scope="module")
def llm():
    rt = dataclasses.replace(tiny_runtime(seed=4), tokenizer=StubTokenizer())
    return LLM(runtime=rt, engine=EngineConfig(kv_cache_tokens=4096))


def test_generation_logprobs_agree_with_llm_score(llm):
    query = Query("q", tuple(range(3, 30)))
    gen = EngineGenerator(llm, temperature=1.0, max_new_tokens=6, seed=1, logprobs=True)
    branches = gen.extend(query, [(Branch(), 3)], None)[0]
    model = ModelScore(llm, gen.account)
    mean, total = TokenLogprob(mean=True), TokenLogprob(model, mean=False)
    for b in branches:
        assert len(b.logprobs) == 6
        rescored = model(list(query.prompt_ids), list(b.token_ids))
        assert b.logprobs == pytest.approx(rescored, abs=1e-4)
        assert mean.score(query, [b])[0] == pytest.approx(sum(rescored) / 6, abs=1e-4)
        # without recorded log-probabilities the scorer asks the model
        bare = dataclasses.replace(b, logprobs=None)
        assert total.score(query, [bare])[0] == pytest.approx(sum(rescored), abs=1e-4)
    assert gen.account.scored_tokens == 3 * 6 * 2
    with pytest.raises(ValueError, match="no log-probabilities"):
        TokenLogprob().score(query, [dataclasses.replace(branches[0], logprobs=None)])


class FakeModel:
    """A ModelScore stand-in: characters are tokens, and log p of a continuation is looked up."""

    def __init__(self, logp):
        self.logp, self.calls = logp, []

    def __call__(self, prompt_ids, continuation_ids):
        prompt, cont = "".join(map(chr, prompt_ids)), "".join(map(chr, continuation_ids))
        self.calls.append((prompt, cont))
        return [self.logp[cont] / len(cont)] * len(cont)

    def encode(self, text):
        return [ord(c) for c in text]

    def prompt(self, text):
        return [ord(c) for c in "<user>" + text + "</user>"]


def test_ptrue_normalizes_over_the_two_choices():
    model = FakeModel({"A": math.log(0.3), "B": math.log(0.1)})
    score = PTrue(model).score(Query("What is 2 + 2?", ()), [Branch(text=" 4 ")])[0]
    assert score == pytest.approx(math.log(0.75))
    prompt, choice = model.calls[0]
    assert "What is 2 + 2?" in prompt and "Proposed answer: 4" in prompt and prompt.endswith(PTRUE_REPLY)
    assert [c for _, c in model.calls] == ["A", "B"]


def test_reverse_likelihood_scores_the_question_given_the_answer():
    model = FakeModel({" Why?": -2.5})
    assert ReverseLikelihood(model).score(Query("Why? ", ()), [Branch(text="Because.")]) == [pytest.approx(-2.5)]
    prompt, cont = model.calls[0]
    assert "Because." in prompt and cont == " Why?"


def test_build_scorer_rejects_bad_names_and_missing_models():
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorer("oracle", None)
    with pytest.raises(ValueError, match="needs the model"):
        build_scorer("ptrue", None)
    with pytest.raises(ValueError, match="directory"):
        build_scorer("reward", None)
    assert build_scorer("mean-logprob", None).needs_logprobs


def _tiny_reward_model(path, labels: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "what", "is", "2", "+", "?", "4", "5", "the", "answer"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=labels, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


@pytest.mark.parametrize("labels", [1, 2])
def test_reward_model_from_a_local_directory(tmp_path, labels):
    pytest.importorskip("transformers")
    from transformers import AutoModelForSequenceClassification

    tok = _tiny_reward_model(tmp_path, labels)
    scorer = build_scorer("reward", None, str(tmp_path))
    query = Query("what is 2 + 2 ?", ())
    answers = [Branch(text="the answer is 4"), Branch(text="5"), Branch(text="the answer is 5")]
    scores = scorer.score(query, answers)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    for answer, score in zip(answers, scores):
        with torch.inference_mode():
            logits = model(**tok(query.question, answer.text, return_tensors="pt")).logits[0]
        want = torch.nn.functional.logsigmoid(logits[0]) if labels == 1 else logits.log_softmax(-1)[-1]
        assert score == pytest.approx(float(want), abs=1e-4)  # padding in the batch changes nothing
        assert score <= 0
    assert scorer.score(query, answers) == pytest.approx(scores)


def test_model_score_counts_and_rejects_empty(llm):
    account = Account()
    model = ModelScore(llm, account)
    assert len(model([1, 2, 3], [4, 5])) == 2 and account.scored_tokens == 2 and account.score_forwards == 1
    with pytest.raises(ValueError, match="empty"):
        model([1, 2], [])

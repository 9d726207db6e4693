"""`forerun serve` through the official openai client, against real server processes: a tiny random
model (fast, real tokenizer) for the API surface and errors, the embedded q4 model for equality with
`forerun generate` and losslessness through speculation; plus in-process checks of loading and
in-stream failures."""
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from helpers_serve import REPO, ServerProcess, metric, openai_client, running_server, sse_payloads, tiny_model_dir

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    yield from running_server("--model", str(tiny_dir), "--served-model-name", "tiny", "--api-key", KEY,
                              "--method", "pld", "--kv-cache-tokens", "16384", "--max-num-seqs", "8",
                              log=tmp_path_factory.mktemp("logs") / "tiny.log")


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, KEY)


def greedy_chat(client, **kw):
    kw.setdefault("messages", MESSAGES)
    return client.chat.completions.create(model="tiny", temperature=0, **kw)


# -- the API surface ----------------------------------------------------------------------------------

def test_models_and_health(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_and_its_usage(client):
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.index == 0 and choice.text
    assert choice.finish_reason in ("stop", "length")
    prompt_ids = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"), json={"prompt": "Once upon a time"},
                            headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert 0 < out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    stats = out.model_extra["forerun"]
    assert stats["method"] == "pld" and stats["choices"][0]["new_tokens"] == out.usage.completion_tokens
    assert stats["choices"][0]["target_forwards"] >= 1 and stats["choices"][0]["tau"] >= 1


def test_chat_streamed_equals_unstreamed(client):
    whole = greedy_chat(client, max_tokens=20)
    chunks = list(greedy_chat(client, max_tokens=20, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)


def test_completion_streamed_equals_unstreamed(client):
    args = dict(model="tiny", prompt="The weather today", max_tokens=16, temperature=0)
    whole = client.completions.create(**args).choices[0]
    chunks = list(client.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.finish_reason


def test_n3_choices_are_interleaved_and_finish_last(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, n=3, temperature=1.0, seed=3,
                                         max_tokens=12)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) > 1  # three samples, not one copied
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, n=3, temperature=1.0, seed=3,
                                                 max_tokens=12, stream=True))
    order = [c.choices[0].index for c in chunks]
    last = {i: max(j for j, k in enumerate(order) if k == i) for i in range(3)}
    content = [c.choices[0].index for c in chunks if c.choices[0].delta.content]
    assert content.index(1) < len(content) - 1 - content[::-1].index(0)  # 1 streams before 0 has ended
    for j, c in enumerate(chunks):
        assert bool(c.choices[0].finish_reason) == (j == last[c.choices[0].index])
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in range(3)]
    assert texts == [c.message.content for c in sorted(out.choices, key=lambda c: c.index)]


def test_several_prompts_and_token_ids(client):
    out = client.completions.create(model="tiny", prompt=["Hello", "Goodbye"], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text != out.choices[2].text == out.choices[3].text
    ids = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"), json={"prompt": "Hello"},
                     headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text


def test_stop_strings(client):
    full = greedy_chat(client, max_tokens=24).choices[0].message.content
    words = full.split()
    stop = words[len(words) // 2]
    before = full[:full.index(stop)]
    out = greedy_chat(client, max_tokens=24, stop=[stop, "\x00never"]).choices[0]
    assert (out.message.content, out.finish_reason) == (before, "stop")
    kept = greedy_chat(client, max_tokens=24, stop=stop, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].message.content == before + stop
    streamed = "".join(c.choices[0].delta.content or "" for c in greedy_chat(client, max_tokens=24, stop=stop,
                                                                              stream=True))
    assert streamed == before


def test_stop_token_ids_and_ignore_eos(client):
    vocab = 49152
    out = greedy_chat(client, max_tokens=8, extra_body={"stop_token_ids": list(range(vocab))}).choices[0]
    assert (out.message.content, out.finish_reason) == ("", "stop")
    full = greedy_chat(client, max_tokens=24, extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 24 and full.choices[0].finish_reason == "length"
    half = greedy_chat(client, max_tokens=24, extra_body={"stop_token_ids": list(range(vocab // 2))})
    assert full.choices[0].message.content.startswith(half.choices[0].message.content)
    assert half.choices[0].finish_reason == "stop" and half.usage.completion_tokens < 24


def test_seed_reproducibility(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt="Tell me a story", max_tokens=16, temperature=0.9,
                                         top_p=0.95, seed=seed, extra_body={"top_k": 50}).choices[0].text
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_include_usage_chunk(client):
    args = dict(model="tiny", messages=MESSAGES, n=2, max_tokens=8, seed=1)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    *body, last = chunks
    assert last.choices == [] and all(c.usage is None and len(c.choices) == 1 for c in body)
    def counts(usage):  # the cached prompt tokens differ: the first request left its prompt in the cache
        return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens
    assert counts(last.usage) == counts(whole.usage)  # the same seed draws the same tokens


def test_sse_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "Hi", "max_tokens": 5, "stream": True}, timeout=60) as r:
        payloads = sse_payloads(r.iter_lines())
    assert payloads[-1] == "[DONE]" and all(json.loads(p)["choices"] for p in payloads[:-1])


def test_echo(client):
    out = client.completions.create(model="tiny", prompt="Echo this", max_tokens=4, temperature=0, echo=True)
    assert out.choices[0].text.startswith("Echo this") and len(out.choices[0].text) > len("Echo this")
    with pytest.raises(openai.BadRequestError, match="max_tokens 0"):  # nothing to do without the echo
        client.completions.create(model="tiny", prompt="Echo this", max_tokens=0)


@pytest.fixture(scope="module")
def tiny_reference(tiny_dir):
    """The server's weights loaded in this process: what its log-probabilities must be."""
    from forerun import LLM
    return LLM(str(tiny_dir))


def test_echo_with_logprobs_scores_the_prompt(client, tiny_reference):
    """lm-evaluation-harness's loglikelihood request (token ids, echo, logprobs, max_tokens 1), and the
    older max_tokens 0 form: every prompt token after the first scored as the model scores it in
    process, the first null, then the generated token; streamed the same."""
    ids = tiny_reference.tokenizer.encode("Once upon a time there was a small cat who lived by the sea.")
    ref = tiny_reference.engine.prompt_logprobs(ids, top=2)
    for max_tokens in (1, 0):
        out = client.completions.create(model="tiny", prompt=[ids], max_tokens=max_tokens, temperature=0, echo=True,
                                        logprobs=2).choices[0]
        lp = out.logprobs
        assert len(lp.tokens) == len(lp.text_offset) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx([e.logprob for e in ref[1:]], abs=1e-4)
        for e, top in zip(ref[1:], lp.top_logprobs[1:len(ids)]):
            assert list(top.values()) == pytest.approx([v for _, v in e.top], abs=1e-4)
        assert out.text.startswith(tiny_reference.tokenizer.decode(ids))
        if max_tokens == 1:  # greedy: the generated token is the most likely one
            assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-5)
            assert lp.text_offset[-1] == len(tiny_reference.tokenizer.decode(ids))
        else:
            assert out.finish_reason == "length" and out.text == tiny_reference.tokenizer.decode(ids)
    usage = client.completions.create(model="tiny", prompt=[ids], max_tokens=0, echo=True).usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 0)
    for max_tokens in (0, 3):  # streamed: the echo chunk carries the prompt's logprobs
        chunks = [c.choices[0] for c in client.completions.create(
            model="tiny", prompt=[ids], max_tokens=max_tokens, temperature=0, echo=True, logprobs=2, stream=True)]
        assert chunks[0].logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in ref[1:]], abs=1e-4)
        assert chunks[-1].finish_reason == "length"
        assert sum(len(c.logprobs.tokens) for c in chunks) == len(ids) + max_tokens


def test_vllm_prompt_logprobs_on_completions_and_chat(client, tiny_reference):
    """vLLM's prompt_logprobs extra: per prompt token {id: logprob, rank, decoded_token} for the token
    and the top n, None for the first; on each completion choice, at the top of a chat response."""
    ids = tiny_reference.tokenizer.encode("The sea is")
    ref = tiny_reference.engine.prompt_logprobs(ids, top=3)
    out = client.completions.create(model="tiny", prompt="The sea is", max_tokens=2, temperature=0, n=2,
                                    extra_body={"prompt_logprobs": 3})
    for choice in out.choices:
        got = choice.model_extra["prompt_logprobs"]
        assert got[0] is None and len(got) == len(ids)
        for token, e, entry in zip(ids[1:], ref[1:], got[1:]):
            assert entry[str(token)]["logprob"] == pytest.approx(e.logprob, abs=1e-4)
            assert entry[str(token)]["rank"] == e.rank >= 1
            assert {str(t) for t, _ in e.top} <= entry.keys() and len(entry) <= 4
            best = str(e.top[0][0])
            assert entry[best]["rank"] == 1 and entry[best]["decoded_token"] == tiny_reference.tokenizer.decode(
                [e.top[0][0]], skip_special=False)
    chat = greedy_chat(client, max_tokens=2, extra_body={"prompt_logprobs": 0})
    prompt = tiny_reference.encode(MESSAGES)
    got = chat.model_extra["prompt_logprobs"]
    assert len(got) == len(prompt) and got[0] is None
    assert [entry[str(t)]["logprob"] for t, entry in zip(prompt[1:], got[1:])] == pytest.approx(
        [e.logprob for e in tiny_reference.engine.prompt_logprobs(prompt)[1:]], abs=1e-4)
    assert all(len(entry) == 1 for entry in got[1:])
    with pytest.raises(openai.BadRequestError, match="stream"):
        greedy_chat(client, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 1})


def test_completion_logprobs(client):
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0,
                                    logprobs=3).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3
        assert value == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs_streamed_and_not(client):
    args = dict(model="tiny", messages=MESSAGES, max_tokens=10, logprobs=True, top_logprobs=2, temperature=0,
                extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args).choices[0].logprobs.content
    assert len(whole) == 10
    for entry in whole:
        assert [t.token for t in entry.top_logprobs][0] == entry.token and len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = [e for c in client.chat.completions.create(stream=True, **args) if c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-5)
    hot = client.chat.completions.create(**{**args, "temperature": 2.0, "seed": 5}).choices[0].logprobs.content
    first = [(t.token, t.logprob) for t in hot[0].top_logprobs]  # the model's own law, before temperature
    assert [t for t, _ in first] == [t.token for t in whole[0].top_logprobs]
    assert [v for _, v in first] == pytest.approx([t.logprob for t in whole[0].top_logprobs], abs=1e-5)
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_speculation_per_request_is_lossless(client):
    texts = {}
    for spec in ({"method": "ar"}, {"method": "pld", "num_draft": 3}, "pld", {"budget": "goodput"}):
        out = greedy_chat(client, max_tokens=24, extra_body={"speculation": spec})
        texts[json.dumps(spec)] = out.choices[0].message.content
        method = spec if isinstance(spec, str) else spec.get("method", "pld")
        assert out.model_extra["forerun"]["method"] == method
    assert len(set(texts.values())) == 1, texts


def test_tokenize_detokenize(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}, headers=headers).json()
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] == 256
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}, headers=headers).json()
    assert text["prompt"].strip() == "hello world"
    chat = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}, headers=headers).json()
    assert chat["count"] > ids["count"]


# -- errors -------------------------------------------------------------------------------------------

SURROGATE = "\ud800"  # valid in JSON as an escape, not valid Unicode
OK_CHAT = {"messages": MESSAGES, "max_tokens": 2}


@pytest.mark.parametrize("path, body, where", [
    ("/v1/completions", {"prompt": SURROGATE, "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "a" + SURROGATE], "max_tokens": 2}, "prompt.1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": SURROGATE}]}, "messages.0.name"),
    ("/v1/chat/completions", {"messages": [{"role": SURROGATE, "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**OK_CHAT, "stop": ["ok", SURROGATE]}, "stop.1"),
    ("/v1/chat/completions", {**OK_CHAT, "model": SURROGATE}, "model"),
    ("/v1/chat/completions", {**OK_CHAT, "user": SURROGATE}, "user"),  # a field forerun ignores
    ("/v1/chat/completions", {**OK_CHAT, "tools": [{"type": "function", SURROGATE: {}}], "tool_choice": "none"},
     "a key in tools.0"),
    ("/v1/chat/completions", {**OK_CHAT, "speculation": SURROGATE}, "speculation"),
    ("/v1/chat/completions", {**OK_CHAT, "scaling": {"strategy": "vote", "n": 2, "delimiter": SURROGATE}},
     "scaling.delimiter"),
    ("/tokenize", {"prompt": SURROGATE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
    ("/detokenize", {"tokens": [1], "model": SURROGATE}, "model"),
])
def test_lone_surrogates_are_400(server, path, body, where):
    """A lone UTF-16 surrogate is valid JSON but not Unicode: no tokenizer or UTF-8 encoder takes it."""
    r = httpx.post(server.url + path, content=json.dumps(body), timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and f"{where} holds a lone UTF-16 surrogate" in error["message"]


def test_chat_roles(server, client):
    """OpenAI's roles: developer is rendered as system, a tool's message as the template renders it;
    any other role is a 400."""
    headers = {"Authorization": f"Bearer {KEY}"}

    def tokens(role):
        return httpx.post(server.url + "/tokenize", headers=headers, json={"messages": [
            {"role": role, "content": "Be brief."}, *MESSAGES]}).json()["tokens"]

    assert tokens("developer") == tokens("system")
    tool = greedy_chat(client, max_tokens=4, messages=[*MESSAGES, {"role": "assistant", "content": "Let me look."},
                                                       {"role": "tool", "content": "42", "tool_call_id": "c1"}])
    assert tool.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        greedy_chat(client, max_tokens=4, messages=[{"role": "wizard", "content": "hi"}])
    assert "messages.0.role" in str(e.value) and "'developer'" in str(e.value)


def test_a_draft_model_the_server_does_not_allow_is_400(client, tiny_dir):
    """Whether the path exists or not, the answer is the same, and nothing reads it."""
    answers = []
    for path in (str(tiny_dir), "/no/such/model", "/etc/passwd"):
        with pytest.raises(openai.BadRequestError) as e:
            greedy_chat(client, max_tokens=2, extra_body={"speculation": {"method": "draft", "draft_model": path}})
        answers.append(e.value.body)
    assert answers[0] == answers[1] == answers[2] and answers[0]["param"] == "speculation.draft_model"
    assert "--allow-draft-model" in answers[0]["message"]


def test_api_keys_come_from_the_environment_too(monkeypatch):
    """`forerun serve` reads FORERUN_API_KEY and bench-serve OPENAI_API_KEY, so the key need not be
    on a command line; the flag wins; an empty key is none."""
    from forerun.serve.cli import API_KEY_VARIABLE, CLIENT_KEY_VARIABLE, key_of

    assert (API_KEY_VARIABLE, CLIENT_KEY_VARIABLE) == ("FORERUN_API_KEY", "OPENAI_API_KEY")
    monkeypatch.setenv(API_KEY_VARIABLE, "from-env")
    assert key_of(None, API_KEY_VARIABLE) == "from-env" and key_of("flag", API_KEY_VARIABLE) == "flag"
    assert key_of("", API_KEY_VARIABLE) is None
    monkeypatch.delenv(API_KEY_VARIABLE)
    assert key_of(None, API_KEY_VARIABLE) is None

@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1), "temperature"),
    (dict(n=0), "n"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=10_000), "context"),
    (dict(stop=[""]), "stop"),
    (dict(stop=[str(i) for i in range(17)]), "at most 16 stop strings"),
    (dict(stop="x" * 257), "at most 256 characters"),
    (dict(extra_body={"scaling": {"strategy": "vote", "n": 2, "delimiter": "x" * 257}}), "scaling.delimiter"),
    (dict(extra_body={"speculation": {"options": {"datastore": "/etc"}}}), "options: Extra inputs are not permitted"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias={"the": 1}), "logit_bias"),
    (dict(logit_bias={"99999999": 1}), "logit_bias"),
    (dict(logit_bias={"5": 101}), "logit_bias"),
    (dict(extra_body={"speculation": {"method": "telepathy"}}), "telepathy"),
    (dict(extra_body={"speculation": {"num_draft": 9, "max_draft": 4}}), "num_draft"),
    (dict(extra_body={"speculation": {"forced_tokens": "sometimes"}}), "forced_tokens"),
    (dict(extra_body={"stop_token_ids": [-3]}), "stop_token_ids"),
    (dict(top_logprobs=3), "logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}),
     "response_format.json_schema.schema"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}]),
     "tools.0.function.parameters"),
    (dict(tool_choice={"type": "function", "function": {"name": "g"}},
          tools=[{"type": "function", "function": {"name": "f"}}]), "tool_choice"),
    (dict(tool_choice="required"), "no tools"),
    (dict(extra_body={"guided_regex": "((", "guided_choice": ["a"]}), "one constraint"),
    (dict(extra_body={"structured_outputs": {"regex": "(("}}), "structured_outputs"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(extra_body={"min_p": 1.5}), "min_p"),
    (dict(extra_body={"min_tokens": -1}), "min_tokens"),
    (dict(max_tokens=4, extra_body={"min_tokens": 5}), "min_tokens"),
    (dict(extra_body={"bad_words": [" "]}), "bad_words"),
    (dict(extra_body={"guided_json": {"type": "frob"}}), "guided_json"),
    (dict(extra_body={"prompt_logprobs": 21}), "prompt_logprobs"),
    (dict(extra_body={"echo": True}), "echo"),
    (dict(extra_body={"continue_final_message": True}), "add_generation_prompt"),
    (dict(extra_body={"continue_final_message": True, "add_generation_prompt": False}), "assistant"),
])
def test_invalid_parameters_are_400(client, kw, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, **kw)
    assert message in str(e.value)
    assert e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("kw", [dict(n=2, best_of=1), dict(best_of=3, temperature=0), dict(best_of=3, stream=True),
                                dict(best_of=200)], ids=str)
def test_invalid_best_of_is_400_naming_it(client, kw):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Once", max_tokens=4, **kw)
    assert e.value.body["param"] == "best_of" or "best_of" in e.value.body["message"]


PROCESSED = dict(presence_penalty=1.5, frequency_penalty=0.5, logit_bias={"13": 4.0},
                 extra_body={"repetition_penalty": 1.4, "min_tokens": 12, "min_p": 0.05, "top_k": 20})


def test_sampling_parameters_are_exact_through_speculation(client):
    """The penalties, logit bias, min_tokens and bad words change the greedy text, and every method
    gives ar's text with them (chat and completions, streamed too)."""
    def chat(speculation, stream=False, **kw):
        extra = {**kw.pop("extra_body", {}), "speculation": speculation}
        args = dict(messages=MESSAGES, max_tokens=24, extra_body=extra, **kw)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in greedy_chat(client, stream=True, **args))
        return greedy_chat(client, **args).choices[0].message.content

    plain = chat("ar")
    # the random model rarely repeats itself: its own first token as a bad word makes sure the output changes
    first = greedy_chat(client, max_tokens=1, logprobs=True).choices[0].logprobs.content[0].token
    processed = {**PROCESSED, "extra_body": {**PROCESSED["extra_body"], "bad_words": [first]}}
    ref = chat("ar", **processed)
    assert ref != plain
    for spec in ("pld", "recycle", {"method": "layer-skip", "exit_layer": 1}):
        assert chat(spec, **processed) == ref, spec
    assert chat("pld", stream=True, **processed) == ref

    def completion(speculation):
        return client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0,
                                         **{**processed, "extra_body": {**processed["extra_body"],
                                                                        "speculation": speculation}}).choices[0].text
    assert completion("pld") == completion("ar")


def test_best_of_returns_the_n_likeliest_samples(client):
    out = client.completions.create(model="tiny", prompt="Once", max_tokens=6, temperature=1.0, n=2, best_of=5,
                                    seed=3, logprobs=0)
    assert len(out.choices) == 2
    scores = [sum(choice.logprobs.token_logprobs) for choice in out.choices]
    assert scores[0] >= scores[1]


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    out = greedy_chat(client, max_tokens=4, response_format={"type": "text"}, tool_choice="none",
                      extra_body={"guided_json": None, "user": "someone"})
    assert out.choices[0].message.content
    out = client.completions.create(model="tiny", prompt="Once", max_tokens=4, temperature=0, best_of=1, suffix="")
    assert out.choices[0].text
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="tiny", prompt="Once", max_tokens=4, suffix="the end")


def test_continue_final_message_continues_the_partial_answer(server, client):
    """vLLM's continue_final_message (its_hub's particle steps send it): the prompt stops inside the
    assistant's partial answer, so greedy chat equals a greedy completion of exactly those tokens."""
    partial = MESSAGES + [{"role": "assistant", "content": "The sea is"}]
    headers = {"Authorization": f"Bearer {KEY}"}
    ids = httpx.post(server.url + "/tokenize", headers=headers,
                     json={"messages": partial, "add_generation_prompt": False,
                           "continue_final_message": True}).json()["tokens"]
    closed = httpx.post(server.url + "/tokenize", headers=headers,
                        json={"messages": partial, "add_generation_prompt": False}).json()["tokens"]
    text = httpx.post(server.url + "/detokenize", headers=headers, json={"tokens": ids}).json()["prompt"]
    assert text.endswith("The sea is") and len(closed) > len(ids) and closed[:len(ids)] == ids
    chat = greedy_chat(client, max_tokens=12, messages=partial,
                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert chat.usage.prompt_tokens == len(ids)
    assert chat.choices[0].message.content == plain.choices[0].text


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=[5] * 300, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="tiny", prompt=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="tiny", prompt=[10**9], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=4)


def test_wrong_or_missing_key_is_401(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_oversized_body_is_413(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt="x" * (5 * 2**20), max_tokens=2)
    assert e.value.status_code == 413 and "larger" in str(e.value)
    chunked = httpx.post(str(client.base_url) + "completions", headers={"Authorization": f"Bearer {KEY}"},
                         content=(b"x" * 2**20 for _ in range(6)), timeout=60)  # no Content-Length
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"


def test_malformed_json_is_400(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()


# -- metrics ------------------------------------------------------------------------------------------

def test_metrics(server, client):
    greedy_chat(client, max_tokens=8, extra_body={"speculation": {"method": "pld"}})
    text = httpx.get(server.url + "/metrics").text
    for name in ("forerun:requests_total", "forerun:num_requests_running", "forerun:num_requests_waiting",
                 "forerun:kv_cache_usage_perc", "forerun:prefix_cache_hit_rate",
                 "forerun:time_to_first_token_seconds_bucket", "forerun:time_per_output_token_seconds_bucket",
                 "forerun:e2e_request_latency_seconds_bucket", "forerun:spec_decode_num_drafts_total",
                 "forerun:spec_decode_num_draft_tokens_total", "forerun:spec_decode_num_accepted_tokens_total",
                 "forerun:spec_decode_num_accepted_tokens_per_pos_total"):
        assert name in text, name
    assert metric(server.url, "forerun:requests_total", route="/v1/chat/completions", status="200") >= 1
    assert metric(server.url, "forerun:num_requests_running") == 0
    assert metric(server.url, "forerun:kv_cache_used_blocks") == 0


# -- fuzzing ------------------------------------------------------------------------------------------

FUZZ_EXAMPLES = 60  # per operation and generation mode (valid, invalid): about 40 s in all here
CHEAP = {"n": 2, "max_tokens": 8, "max_completion_tokens": 8}  # what an example may decode (see _cheap)


def test_fuzzed_requests_never_get_a_5xx(server):
    """Requests schemathesis generates from the server's OpenAPI schema, valid and invalid, half of
    their bodies with a lone surrogate put into one of their strings or keys (which schemathesis
    never generates itself: it keeps to what UTF-8 can encode, but JSON escapes can carry them).
    Driven through schemathesis's Python API and hypothesis, not its pytest plugin."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
    for operation in operations:
        inputs = len(operation.body) + len(operation.query) + len(operation.headers) + len(operation.path_parameters)
        for mode in GenerationMode if inputs else [GenerationMode.POSITIVE]:  # nothing to make invalid
            _fuzz(operation.as_strategy(generation_mode=mode))


def _fuzz(cases) -> None:
    @given(case=cases, data=st.data())
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case, data):
        if isinstance(case.body, dict):
            _cheap(case.body)
        if isinstance(case.body, (dict, list)) and data.draw(st.booleans()):
            _put_lone_surrogate(case.body, data)
        case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=[not_a_server_error], timeout=60)

    run()


def _cheap(body: dict) -> None:
    """Cap the samples and tokens a valid example asks for (n x max_tokens up to 128 x 256 would take
    minutes): the test looks for 5xx, not throughput. Values past the limits stay, for their 400s."""
    for name, cap in CHEAP.items():
        if type(body.get(name)) is int and cap < body[name] <= 256:  # the tiny model's context
            body[name] = cap
    body.setdefault("max_tokens", CHEAP["max_tokens"])


def _put_lone_surrogate(body: dict | list, data) -> None:
    """Into one string of `body` (a value, or a key), or as a new key when it has none."""
    places = []  # (container, key): its value is a string; (dict, None): a dict whose keys may take one
    stack = [body]
    while stack:
        container = stack.pop()
        if isinstance(container, dict):
            places.append((container, None))
        for key, value in (container.items() if isinstance(container, dict) else enumerate(container)):
            if isinstance(value, str):
                places.append((container, key))
            elif isinstance(value, (dict, list)):
                stack.append(value)
    if not places:
        return
    surrogate = data.draw(st.characters(categories=["Cs"]))
    container, key = data.draw(st.sampled_from(places))
    if key is None:
        container[data.draw(st.text(max_size=3)) + surrogate] = data.draw(st.text(max_size=3))
    else:
        text = container[key]
        at = data.draw(st.integers(0, len(text)))
        container[key] = text[:at] + surrogate + text[at:]


# -- in-process: loading and failures -----------------------------------------------------------------

def _wait_healthy(c, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while c.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "never became healthy"
        time.sleep(0.05)


def test_503_while_loading(tiny_dir):
    from fastapi.testclient import TestClient

    from forerun.engine.engine import Engine
    from forerun.models.runtime import load
    from forerun.serve.app import ServeConfig, create_app

    gate = threading.Event()

    def slow_load():
        assert gate.wait(60)
        return Engine(load(str(tiny_dir)))

    with TestClient(create_app(slow_load, ServeConfig("tiny"))) as c:
        for path in ("/health", "/v1/models"):
            r = c.get(path)
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "hi"}).status_code == 503
        gate.set()
        _wait_healthy(c)
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_failure_inside_a_stream_sends_an_error_chunk_then_done(tiny_dir):
    from fastapi.testclient import TestClient

    from forerun.engine.engine import Engine
    from forerun.models.runtime import load
    from forerun.serve.app import ServeConfig, create_app

    class FailsOnce(Engine):
        """An engine whose fourth step raises, once."""

        failed = False

        def step(self):
            if self.steps == 3 and not self.failed:
                self.failed = True
                raise RuntimeError("injected failure")
            return super().step()

    body = {"messages": MESSAGES, "max_tokens": 40, "stream": True, "ignore_eos": True, "speculation": "ar"}
    with TestClient(create_app(lambda: FailsOnce(load(str(tiny_dir))), ServeConfig("tiny"))) as c:
        _wait_healthy(c)
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            payloads = sse_payloads(r.iter_lines())
        assert r.status_code == 200 and payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert "injected failure" in error["message"] and error["type"] == "internal_error"
        assert len(payloads) >= 4  # the role chunk and content before the failure
        again = c.post("/v1/chat/completions", json={**body, "stream": False})  # the server goes on serving
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 40
        assert 'finished_reason="error"' in c.get("/metrics").text


def test_default_max_tokens_fits_the_kv_pool(tiny_dir):
    """Without max_tokens a chat may run to the end of the context, but no further than a small
    pool can hold for its n samples; a request the pool can never hold is a 400."""
    from fastapi.testclient import TestClient

    from forerun.config import EngineConfig
    from forerun.engine.engine import Engine
    from forerun.models.runtime import load
    from forerun.serve.app import ServeConfig, create_app

    app = create_app(lambda: Engine(load(str(tiny_dir)), EngineConfig(kv_cache_tokens=320)), ServeConfig("tiny"))
    with TestClient(app) as c:
        _wait_healthy(c)
        body = {"messages": MESSAGES, "n": 2, "ignore_eos": True, "temperature": 0}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] // 2 < 256  # cut by the pool, not the context
        r = c.post("/v1/chat/completions", json={**body, "max_tokens": 200})
        assert r.status_code == 400 and "KV" in r.json()["error"]["message"]


def test_speculation_configurations_are_bounded(tiny_dir):
    """Each distinct speculation configuration keeps a drafter (and its learned odds): a client may
    not create them without end, nor lock others out by creating many. Past the bound the least
    recently used idle one is forgotten, and the server's own is kept."""
    from fastapi.testclient import TestClient

    from forerun.engine.engine import Engine
    from forerun.models.runtime import load
    from forerun.serve.app import ServeConfig, create_app
    from forerun.serve.worker import MAX_SPEC_CONFIGS

    engines = []

    def make_engine():
        engines.append(Engine(load(str(tiny_dir))))
        return engines[-1]

    def complete(i: int) -> int:
        return c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "speculation": {
            "method": "pld", "num_draft": 1 + i % 16, "ngram_max": 1 + i // 16}}).status_code

    default = ServeConfig("tiny").spec
    with TestClient(create_app(make_engine, ServeConfig("tiny"))) as c:
        _wait_healthy(c)
        codes = [complete(i) for i in range(MAX_SPEC_CONFIGS + 8)]
        assert codes == [200] * (MAX_SPEC_CONFIGS + 8)
        kept = engines[0].drafters
        assert len(kept) == MAX_SPEC_CONFIGS and default in kept
        assert complete(MAX_SPEC_CONFIGS + 7) == 200 and len(kept) == MAX_SPEC_CONFIGS  # a kept one is reused


def test_the_engine_forgets_a_configuration_only_when_no_request_uses_it(tiny_dir):
    from forerun.config import SamplingParams, SpecConfig
    from forerun.engine.engine import Engine
    from forerun.models.runtime import load

    engine = Engine(load(str(tiny_dir)))
    spec = SpecConfig(method="pld", budget="goodput", guard=True)
    engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0.0), spec, request_id="a")
    engine.step()
    assert spec in engine.drafters and not engine.forget(spec)  # in use: kept
    while engine.has_unfinished():
        engine.step()
    assert spec in engine.guards and spec in engine.goodput._memory
    assert engine.forget(spec)
    assert spec not in engine.drafters and spec not in engine.guards and spec not in engine.goodput._memory


def test_allowed_draft_models_load_once_and_are_shared(tiny_dir, tmp_path, monkeypatch):
    """A draft model the operator allowed loads once, before the server is ready; every speculation
    configuration that names it drafts with that one copy, losslessly."""
    from fastapi.testclient import TestClient

    import forerun.models.runtime as runtime
    from forerun.engine.engine import Engine
    from forerun.serve.app import ServeConfig, create_app

    draft = str(tiny_model_dir(tmp_path / "draft", seed=1))
    loads = []
    real_load = runtime.load
    monkeypatch.setattr(runtime, "load", lambda path, **kw: loads.append(path) or real_load(path, **kw))
    app = create_app(lambda: Engine(runtime.load(str(tiny_dir))), ServeConfig("tiny", draft_models=(draft,)))
    with TestClient(app) as c:
        _wait_healthy(c)
        assert loads == [str(tiny_dir), draft]

        def text(speculation):
            r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 12, "temperature": 0,
                                                     "ignore_eos": True, "speculation": speculation})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        texts = {text({"method": "draft", "draft_model": draft, "num_draft": k}) for k in (1, 2, 3)}
        assert texts == {text("ar")}
        drafters = [d for spec, d in app.state.worker.engine.drafters.items() if spec.method == "draft"]
        assert len(drafters) == 3 and len({id(d.draft) for d in drafters}) == 1
        assert loads == [str(tiny_dir), draft]


# -- the embedded model, q4 ---------------------------------------------------------------------------

SUMMARY = "Summarize: The cat sat on the mat. The cat was happy because the mat was warm and soft."


@pytest.fixture(scope="module")
def q4_server(tmp_path_factory):
    yield from running_server("--quant", "q4", "--method", "pld", "--max-num-seqs", "16",
                              log=tmp_path_factory.mktemp("logs") / "q4.log")


@pytest.fixture(scope="module")
def q4_client(q4_server):
    return openai_client(q4_server, timeout=300)


def test_greedy_chat_equals_forerun_generate(q4_client):
    prompt = "Name three primary colors."
    proc = subprocess.run([sys.executable, "-m", "forerun", "generate", prompt, "--json", "--quant", "q4",
                           "--method", "ar", "--max-new-tokens", "32"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    ref = json.loads(proc.stdout)
    out = q4_client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=32,
                                            messages=[{"role": "user", "content": prompt}])
    assert out.choices[0].message.content == ref["text"]
    assert out.usage.completion_tokens == len(ref["token_ids"])


def test_speculation_is_lossless_through_the_server(q4_client):
    def text(speculation, stream=False):
        args = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": SUMMARY}], temperature=0,
                    max_tokens=32, extra_body={"speculation": speculation, "ignore_eos": True})
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in q4_client.chat.completions.create(stream=True,
                                                                                                      **args))
        out = q4_client.chat.completions.create(**args)
        return out.choices[0].message.content, out.model_extra["forerun"]["choices"][0]["tau"]

    ref, tau = text("ar")
    assert tau == 1.0
    accepted = False
    for spec in ("pld", {"method": "layer-skip", "exit_layer": 20}, "recycle", {"method": "pld", "budget": "goodput"}):
        got, tau = text(spec)
        assert got == ref, spec
        accepted |= tau > 1.0
    assert accepted  # some method did speculate
    assert text("pld", stream=True) == ref


def _idle(url: str, aborted_before: float, timeout: float = 20) -> float:
    """Seconds until the server is idle with every KV block back, after one more abort."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if metric(url, "forerun:num_requests_running") == 0 and metric(url, "forerun:kv_cache_used_blocks") == 0 \
                and _aborts(url) > aborted_before:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError("the aborted request kept running or kept its KV blocks")


def _aborts(url: str) -> float:
    return metric(url, "forerun:request_success_total", finished_reason="abort")


LONG = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


def test_a_disconnected_stream_is_aborted(q4_server):
    before = _aborts(q4_server.url)
    with httpx.stream("POST", q4_server.url + "/v1/chat/completions", json={**LONG, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):  # a few chunks in, the client goes away
            next(lines)
    _idle(q4_server.url, before)


def test_a_disconnected_plain_request_is_aborted(q4_server):
    before = _aborts(q4_server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(q4_server.url + "/v1/chat/completions", json=LONG, timeout=1.5)
    _idle(q4_server.url, before)


def test_sigterm_drains_requests_in_flight(q4_server):
    """Runs last of the q4 tests: it stops their server."""
    with httpx.stream("POST", q4_server.url + "/v1/chat/completions", timeout=120,
                      json={**LONG, "max_tokens": 40, "stream": True}) as r:
        lines = r.iter_lines()
        first = [next(lines) for _ in range(4)]
        q4_server.proc.send_signal(signal.SIGTERM)
        payloads = sse_payloads(first + list(lines))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) > 4
    assert q4_server.proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    log = q4_server.log()
    assert "Application shutdown complete" in log and "Traceback" not in log


@pytest.mark.parametrize("args, status, message", [
    (["--method", "nonsense"], 2, "unknown method"),
    (["--quant", "q4", "--dtype", "bfloat16"], 2, "float32"),
    (["--model", "/no/such/model"], 1, "does not exist"),
])
def test_serve_bad_flags_are_clear_errors(args, status, message, tmp_path):
    proc = ServerProcess(*args, log=tmp_path / "bad.log")
    assert proc.proc.wait(120) == status
    log = proc.log()
    proc.stop()
    assert "forerun serve: error:" in log or "forerun: error:" in log
    assert message in log and "Traceback" not in log


def test_outputs_waiting_together_are_joined_per_request():
    """When the event loop falls behind, a request's outputs of several steps become one chunk's
    worth: tokens, text and logprobs joined in order, the last step's finish reason."""
    from forerun.engine.output import RequestOutput, SampleOutput
    from forerun.serve.jobs import coalesced
    from forerun.types import TokenLogprob

    lp = [TokenLogprob(t, -0.5, (), 1) for t in (5, 6, 7)]
    steps = [RequestOutput("a", [SampleOutput(0, [5], "x", None, lp[:1]), SampleOutput(1, [9], "q", None, [])], False),
             RequestOutput("b", [SampleOutput(0, [3], "z", None)], False),
             RequestOutput("a", [SampleOutput(0, [6, 7], "yz", "eos", lp[1:])], True, ("done",))]
    a, b = coalesced(steps)
    assert b is steps[1]
    assert a.request_id == "a" and a.finished and a.generations == ("done",)
    first, second = a.samples
    assert (first.index, first.token_ids, first.text, first.finish_reason, first.logprobs) == (0, [5, 6, 7], "xyz", "eos", lp)
    assert second is steps[0].samples[1]

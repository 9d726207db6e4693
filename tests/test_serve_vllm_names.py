"""`forerun serve` as a vLLM user drives it: the key from FORERUN_API_KEY, --max-model-len,
generation_config.json defaults, usage.prompt_tokens_details.cached_tokens and /metrics under vLLM's
names with a model_name label. One server process on loopback, on a tiny random model."""
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers_serve import metric, openai_client, running_server, tiny_model_dir

KEY = "key-from-the-environment"
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 8  # more than two KV blocks of tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0, "max_new_tokens": 5}))
    yield from running_server("--model", str(model), "--served-model-name", "tiny", "--max-model-len", "128",
                              "--kv-cache-tokens", "4096", "--max-num-seqs", "4", "--method", "ar",
                              log=tmp_path_factory.mktemp("logs") / "serve.log", env={"FORERUN_API_KEY": KEY})


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, KEY)


def test_the_key_comes_from_the_environment(server, client):
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_max_model_len_is_the_context_requests_get(server, client):
    assert client.models.list().data[0].model_extra["max_model_len"] == 128
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt=LONG_PROMPT * 2, max_tokens=4)
    assert "context holds 128" in str(refused.value)


def test_unset_fields_take_the_generation_config(client):
    chat = [{"role": "user", "content": "Tell me a story."}]
    unset = client.chat.completions.create(model="tiny", messages=chat, extra_body={"ignore_eos": True})
    greedy = client.chat.completions.create(model="tiny", messages=chat, temperature=0, max_tokens=5,
                                            extra_body={"ignore_eos": True})
    assert unset.usage.completion_tokens == 5  # the model's max_new_tokens
    assert unset.choices[0].message.content == greedy.choices[0].message.content  # its temperature 0
    longer = client.chat.completions.create(model="tiny", messages=chat, max_tokens=9, extra_body={"ignore_eos": True})
    assert longer.usage.completion_tokens == 9
    sampled = {client.chat.completions.create(model="tiny", messages=chat, temperature=1.5, seed=seed,
                                              extra_body={"ignore_eos": True}).choices[0].message.content
               for seed in range(4)}
    assert sampled != {greedy.choices[0].message.content}  # a request's temperature wins


def test_a_repeated_prompt_reports_its_cached_tokens(client):
    prompt = "A prompt of its own. " + LONG_PROMPT
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 32 <= cached < again.usage.prompt_tokens and cached % 16 == 0  # whole KV blocks of the prompt


def test_metrics_carry_vllms_names_and_the_model_name(server, client):
    client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens",
                 "generation_tokens", "request_success", "time_to_first_token_seconds",
                 "time_per_output_token_seconds", "e2e_request_latency_seconds", "prefix_cache_queries",
                 "prefix_cache_hits", "num_preemptions", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                 "spec_decode_num_accepted_tokens", "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens", "request_params_n", "request_params_max_tokens"):
        family = families[f"forerun:{name}"]
        assert family.samples and all(s.labels["model_name"] == "tiny" for s in family.samples), name
    assert metric(server.url, "forerun:request_success_total", finished_reason="length") >= 1
    assert metric(server.url, "forerun:generation_tokens_total", model_name="tiny") >= 3
    assert metric(server.url, "forerun:prefix_cache_hits_total") % 16 == 0  # tokens, as vLLM counts them
    client.completions.create(model="tiny", prompt="Hello", max_tokens=7, n=2, temperature=1, seed=3)
    assert metric(server.url, "forerun:request_params_max_tokens_bucket", le="10.0") >= 2  # 3 and 7
    assert metric(server.url, "forerun:request_params_n_bucket", le="1.0") >= 1
    assert metric(server.url, "forerun:request_params_n_bucket", le="2.0") >= metric(
        server.url, "forerun:request_params_n_bucket", le="1.0") + 1
    assert metric(server.url, "forerun:request_generation_tokens_sum") >= 3 + 14
    phases = sum(metric(server.url, f"forerun:request_{p}_time_seconds_sum") for p in ("queue", "prefill", "decode"))
    assert 0 < phases <= metric(server.url, "forerun:e2e_request_latency_seconds_sum") + 0.05

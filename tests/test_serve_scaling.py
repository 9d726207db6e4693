"""`forerun serve` with a `scaling` object in a chat request's extra_body, through the official openai
client against a real server process. The model is a tiny random Llama whose head favours digits and
EOS, so its samples carry numbers that votes and answers can be read from."""
import asyncio
import time
from collections import Counter

import httpx
import openai
import pytest
from safetensors.torch import load_file, save_file

from helpers_serve import metric, openai_client, running_server, tiny_model_dir

MAX_NUM_SEQS = 8
MAX_SCALING_JOBS = 2
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]
DIGITS, EOS = range(32, 42), 2  # the embedded tokenizer's ids of "0".."9" and <|im_end|>


def numeric_model_dir(path):
    """tiny_model_dir's model, its output head scaled so that digits and EOS win nearly every step."""
    model = tiny_model_dir(path, context=1024)
    weights = load_file(str(model / "model.safetensors"))
    head = weights["lm_head.weight"]
    favoured = [*DIGITS, EOS]
    scaled = head * 0.05
    scaled[favoured] = head[favoured] * 4
    weights["lm_head.weight"] = scaled
    save_file(weights, str(model / "model.safetensors"))
    return model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = numeric_model_dir(tmp_path_factory.mktemp("numeric-model"))
    yield from running_server("--model", str(model), "--served-model-name", "tiny", "--kv-cache-tokens", "16384",
                              "--max-num-seqs", str(MAX_NUM_SEQS), "--max-scaling-jobs", str(MAX_SCALING_JOBS),
                              log=tmp_path_factory.mktemp("logs") / "scaling.log")


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def scaled(client, scaling: dict, **kw):
    args = dict(model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=3)
    out = client.chat.completions.create(**{**args, **kw}, extra_body={"scaling": scaling})
    return out, out.model_extra["forerun"]["scaling"]


def majority(answers):
    counts = Counter(a for a in answers if a is not None)
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))


def test_vote_answers_the_majority_and_counts_every_token(server, client):
    out, report = scaled(client, {"strategy": "vote", "n": 4})
    answers = [c["answer"] for c in report["candidates"]]
    assert len(answers) == 4 and all(answers)
    assert report["answer"] == majority(answers) == answers[report["chosen"]]
    assert out.choices[0].message.content == report["candidates"][report["chosen"]]["text"]
    assert len(out.choices) == 1 and out.choices[0].finish_reason in ("stop", "length")
    account = report["account"]
    assert account["generated_tokens"] == out.usage.completion_tokens == sum(c["tokens"] for c in report["candidates"])
    assert account["requests"] == 1 and account["score_forwards"] == 0  # one request of n forked samples
    prompt = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()["count"]
    assert out.usage.prompt_tokens == prompt and out.usage.total_tokens == prompt + out.usage.completion_tokens


def test_best_of_n_with_ptrue_returns_the_highest_scored(client):
    out, report = scaled(client, {"strategy": "best-of-n", "n": 4, "reward": "ptrue"})
    scores = [c["score"] for c in report["candidates"]]
    assert len(set(scores)) > 1 and report["chosen"] == scores.index(max(scores))
    assert out.choices[0].message.content == report["candidates"][report["chosen"]]["text"]
    assert report["account"]["score_forwards"] == 2 * 4  # P(A) and P(B) per candidate, on the server's engine


def test_a_seeded_request_repeats(client):
    scaling = {"strategy": "weighted-best-of-n", "n": 4, "reward": "mean-logprob", "task": "arith"}
    (first, a), (again, b) = scaled(client, scaling, seed=11), scaled(client, scaling, seed=11)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert [c["text"] for c in a["candidates"]] == [c["text"] for c in b["candidates"]]
    assert [c["score"] for c in a["candidates"]] == [c["score"] for c in b["candidates"]]
    _, other = scaled(client, scaling, seed=12)
    assert [c["text"] for c in other["candidates"]] != [c["text"] for c in a["candidates"]]


def test_step_level_beam_search(client):
    """'7' as the step delimiter: the beams grow a step at a time, each step one batch of requests."""
    out, report = scaled(client, {"strategy": "beam", "n": 4, "reward": "ptrue", "delimiter": "7", "max_steps": 3,
                                  "options": {"width": 2}}, max_tokens=8)
    assert report["notes"]["rounds"] > 1 and report["account"]["requests"] > 1
    assert out.choices[0].message.content in [c["text"] for c in report["candidates"]]
    assert report["account"]["generated_tokens"] == out.usage.completion_tokens


@pytest.mark.parametrize("kw, scaling, message", [
    ({}, {"strategy": "telepathy", "n": 2}, "unknown strategy 'telepathy'"),
    ({}, {"strategy": "vote", "n": 0}, "scaling.n"),
    ({}, {"strategy": "vote", "n": MAX_NUM_SEQS + 1}, "--max-num-seqs"),
    ({}, {"strategy": "best-of-n", "n": 2}, "needs a scorer"),
    ({}, {"strategy": "adaptive", "n": 2, "options": {"prune": -1.0}}, "needs a scorer"),
    ({}, {"strategy": "best-of-n", "n": 2, "reward": "oracle"}, "unknown scaling.reward 'oracle'"),
    ({}, {"strategy": "best-of-n", "n": 2, "reward": "reward"}, "not served"),
    ({}, {"strategy": "vote", "n": 2, "options": {"width": 2}}, "no option 'width'"),
    ({}, {"strategy": "vote", "n": 2, "task": "chess"}, "unknown task 'chess'"),
    ({}, {"strategy": "vote", "n": 2, "budget": 2}, "budget"),
    ({"stream": True}, {"strategy": "vote", "n": 2}, "stream is not supported with scaling"),
    ({"n": 2}, {"strategy": "vote", "n": 2}, "n > 1 is not supported with scaling"),
    ({"logprobs": True}, {"strategy": "vote", "n": 2}, "logprobs"),
])
def test_invalid_scaling_is_400(client, kw, scaling, message):
    with pytest.raises(openai.BadRequestError) as e:
        scaled(client, scaling, **kw)
    assert message in str(e.value) and e.value.body["type"] == "invalid_request_error"


def _aborted(url: str) -> float:
    return metric(url, "forerun:request_success_total", finished_reason="abort")


def test_a_disconnected_client_aborts_the_strategy(server):
    before = _aborted(server.url)
    body = {"messages": MESSAGES, "max_tokens": 900, "ignore_eos": True, "scaling": {"strategy": "vote", "n": 8}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 20
    while not (_aborted(server.url) > before and metric(server.url, "forerun:num_requests_running") == 0
               and metric(server.url, "forerun:kv_cache_used_blocks") == 0):
        assert time.monotonic() < deadline, "the strategy's requests kept running or kept their KV blocks"
        time.sleep(0.1)
    assert _aborted(server.url) - before == 8  # the eight samples, aborted mid-decode
    assert "Traceback" not in server.log()


def test_plain_requests_still_work(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert len(out.choices) == 1 and out.usage.completion_tokens <= 8
    assert "scaling" not in out.model_extra["forerun"]


def _wait_metric(url: str, name: str, value: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while metric(url, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.05)


def test_scaling_requests_past_the_limit_get_a_429_and_others_go_on(server):
    """Each strategy holds a thread for its whole run: past --max-scaling-jobs a scaling request is
    refused at once with Retry-After rather than queued, and every other request is still served."""
    body = {"messages": MESSAGES, "max_tokens": 900, "ignore_eos": True,
            "scaling": {"strategy": "vote", "n": MAX_NUM_SEQS // MAX_SCALING_JOBS}}

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            running = [asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
                       for _ in range(MAX_SCALING_JOBS)]
            await asyncio.to_thread(_wait_metric, server.url, "forerun:scaling_requests_running", MAX_SCALING_JOBS)
            refused = await http.post("/v1/chat/completions", json=body)
            models = await http.get("/v1/models")
            plain = await http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4})
            for request in running:  # their clients go away: the strategies are aborted
                request.cancel()
            return refused, models, plain

    refused, models, plain = asyncio.run(scenario())
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and "--max-scaling-jobs" in error["message"]
    assert models.status_code == 200 and plain.status_code == 200
    _wait_metric(server.url, "forerun:scaling_requests_running", 0)
    _wait_metric(server.url, "forerun:num_requests_running", 0)

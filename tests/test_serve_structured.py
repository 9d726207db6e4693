"""Structured outputs and tool calls through a real `forerun serve` of the embedded model, as real
clients send them: the official client's parse() with a pydantic model, vLLM's extras, tool_choice
none/auto/required/named (streamed and not), and langchain-openai's bind_tools and
with_structured_output."""
import asyncio
import json
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

from helpers_serve import openai_client, running_server, sse_payloads

MODEL = "SmolLM2-135M-Instruct"


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as OpenAI's strict schemas have

    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=100)
    size: Literal["small", "medium", "large"]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
                   "required": ["timezone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server("--quant", "q4", "--method", "pld", "--max-num-seqs", "8",
                              log=tmp_path_factory.mktemp("logs") / "structured.log")


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=300)


def chat(client, **kw):
    kw = {"messages": ASK, "temperature": 0, "max_tokens": 80, **kw}
    return client.chat.completions.create(model=MODEL, **kw)


def test_parse_with_a_pydantic_model(client):
    out = client.chat.completions.parse(model=MODEL, temperature=0, max_tokens=80, response_format=City,
                                        messages=[{"role": "user", "content": "Describe Paris."}])
    city = out.choices[0].message.parsed
    assert isinstance(city, City) and out.choices[0].finish_reason == "stop"


def test_vllm_extras_constrain_completions_and_chat(client):
    schema = City.model_json_schema()
    out = client.completions.create(model=MODEL, prompt="A city as JSON:", max_tokens=80, temperature=0.8, n=3,
                                    seed=1, extra_body={"guided_json": schema})
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.text), schema)
    out = chat(client, n=2, temperature=1.0, seed=2, extra_body={"guided_choice": ["sunny", "rainy"]})
    assert {c.message.content for c in out.choices} <= {"sunny", "rainy"}
    out = chat(client, extra_body={"structured_outputs": {"regex": r"\d{2}:\d{2}"}})
    assert len(out.choices[0].message.content) == 5 and out.choices[0].message.content[2] == ":"
    out = chat(client, extra_body={"guided_grammar": 'root ::= "It is " ("hot" | "cold") "."'})
    assert out.choices[0].message.content in ("It is hot.", "It is cold.")
    out = chat(client, response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_a_stream_under_a_schema_joins_to_the_whole_answer(client):
    kw = dict(response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}},
              extra_body={"speculation": "ar"})
    whole = chat(client, **kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True, **kw) if c.choices)
    assert streamed == whole
    City.model_validate_json(whole)


def test_forced_tokens_can_be_turned_off_per_request_and_change_only_the_speed(client):
    kw = dict(response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}})
    runs = {forced: chat(client, extra_body={"speculation": {"method": "ar", "forced_tokens": forced}}, **kw)
            for forced in (True, False)}
    assert runs[True].choices[0].message.content == runs[False].choices[0].message.content
    forwards = {forced: out.model_extra["forerun"]["choices"][0]["target_forwards"] for forced, out in runs.items()}
    assert forwards[True] < forwards[False] == runs[False].usage.completion_tokens, forwards


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_a_required_call_is_made_and_streams_as_openai_streams_it(client, choice):
    out = chat(client, tools=[WEATHER, TIME], tool_choice=choice)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and message.content is None, message
    call = message.tool_calls[0]
    tool = WEATHER if call.function.name == "get_weather" else TIME
    if isinstance(choice, dict):
        assert call.function.name == "get_time" and len(message.tool_calls) == 1
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    calls, finish, pieces = {}, None, 0
    for chunk in chat(client, tools=[WEATHER, TIME], tool_choice=choice, stream=True):
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or ():
            entry = calls.setdefault(part.index, {"id": part.id, "name": "", "arguments": ""})
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
            pieces += bool(part.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert pieces > len(calls), "the arguments stream as the model writes them, not in one piece"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
           [(c.function.name, c.function.arguments) for c in message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_tool_choice_none_and_auto_answer_in_the_open_format(client):
    none = chat(client, tools=[WEATHER], tool_choice="none", max_tokens=20)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    auto = chat(client, tools=[WEATHER], tool_choice="auto")
    message = auto.choices[0].message
    assert (auto.choices[0].finish_reason == "tool_calls") == bool(message.tool_calls)
    assert message.tool_calls or message.content
    for call in message.tool_calls or ():  # a call the model starts under "auto" is held to the schema
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    streamed = {}
    for chunk in chat(client, tools=[WEATHER], tool_choice="auto", stream=True):
        for part in chunk.choices[0].delta.tool_calls or ():
            streamed[part.index] = streamed.get(part.index, "") + (part.function.arguments or "")
    assert list(streamed.values()) == [c.function.arguments for c in message.tool_calls or ()]
    # with another constraint, that one holds and the tools' grammar stands aside
    both = chat(client, tools=[WEATHER], response_format={"type": "json_object"})
    assert isinstance(json.loads(both.choices[0].message.content or "{}"), dict) or both.choices[0].message.tool_calls


def test_a_tool_result_in_the_history_is_answered(client):
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'}]
    out = chat(client, messages=history, tools=[WEATHER], max_tokens=30)
    assert out.choices[0].message.content or out.choices[0].message.tool_calls


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                             "properties": {"a": {"type": 3}}}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"guided_regex": "(("}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "start: missing"}, "guided_grammar"),
    ({"guided_grammar": " "}, "guided_grammar"),  # no rule at all: the fuzzer found it a 500
    ({"guided_grammar": 'x ::= "a"'}, "guided_grammar"),  # GBNF without root
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "[]"}}]}]},
     "messages"),
])
def test_malformed_schemas_and_tools_are_400_naming_the_field(server, body, field):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field or r.json()["error"]["param"].startswith(field), r.json()



def test_a_choice_the_vocabulary_cannot_write_is_a_400(server):
    """The fuzzer's request: a guided_choice llguidance's own mask and parser disagree on was a 500
    from the engine's step; it is refused when the request is added."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": ASK, "max_tokens": 4, "guided_choice": ["\U000a7a0b\x17\xafz"]})
    assert r.status_code == 400, r.text
    assert "cannot be written" in r.json()["error"]["message"]


def test_a_constraint_that_breaks_mid_step_fails_its_request_alone(server):
    """A regex needing a byte the vocabulary has no token for (U+A7A0B's lead byte) passes every check
    before the request runs, and llguidance then refuses a token its own mask allowed. That request
    gets a 400 with the reason; a request sent beside it finishes as usual
    (before, the worker failed every request in flight with a 500)."""
    async def both():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            bad = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 8,
                                                          "guided_regex": "\U000a7a0b\x17"})
            good = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 24, "temperature": 0,
                                                           "ignore_eos": True})
            return await asyncio.gather(bad, good)

    bad, good = asyncio.run(both())
    assert bad.status_code == 400 and "cannot be followed" in bad.json()["error"]["message"], bad.text
    assert good.status_code == 200, good.text
    assert good.json()["usage"]["completion_tokens"] == 24

def test_each_of_n_streamed_choices_ends_with_its_calls(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": ASK, "max_tokens": 60, "temperature": 1.0, "seed": 3, "n": 2,
            "stream": True, "tools": [WEATHER], "tool_choice": "required"}) as r:
        payloads = sse_payloads(r.iter_lines())
    assert payloads[-1] == "[DONE]"
    finishes, arguments = {}, {}  # (choice, call) -> the call's arguments, joined
    for chunk in map(json.loads, payloads[:-1]):
        choice = chunk["choices"][0]
        for call in choice["delta"].get("tool_calls", ()):
            key = (choice["index"], call["index"])
            arguments[key] = arguments.get(key, "") + call["function"]["arguments"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == {0: "tool_calls", 1: "tool_calls"}
    assert {choice for choice, _ in arguments} == {0, 1}
    for text in arguments.values():
        jsonschema.validate(json.loads(text), WEATHER["function"]["parameters"])


def test_langchain_bind_tools_and_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="none", temperature=0,
                                      max_tokens=80, max_retries=0)

    class GetWeather(BaseModel):
        """The current weather in a city."""

        city: str = Field(max_length=20)

    reply = llm.bind_tools([GetWeather], tool_choice="any").invoke("What is the weather in Rome?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "GetWeather"
    assert isinstance(reply.tool_calls[0]["args"]["city"], str)
    for method in ("json_schema", "function_calling"):
        city = llm.with_structured_output(City, method=method).invoke("Describe Rome.")
        assert isinstance(city, City), method

"""Twenty JSON schemas of the kinds applications send, decoded by the embedded model in one batch:
every output parses and validates against its schema. Every registered method decodes a quarter of
them (a different quarter for each method in turn, so every schema meets several methods) to the
same tokens as `ar`; sampled, n = 2 samples each, every sample is valid too."""
import json

import jsonschema
import pytest

from helpers_decoding import datastore_for, install_drafters, specs_for
from forerun import LLM, SamplingParams, SpecConfig
from forerun.config import StructuredOutput
from forerun.drafters.registry import methods

NAME = {"type": "string", "maxLength": 24}
STRICT = {"additionalProperties": False}


def obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            **STRICT}


SCHEMAS = [  # (what to ask for, schema)
    ("a person", obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("a book", obj({"title": NAME, "author": NAME, "year": {"type": "integer", "minimum": 1000, "maximum": 2030}})),
    ("a yes or no answer", obj({"answer": {"enum": ["yes", "no"]}})),
    ("a color", obj({"color": {"enum": ["red", "green", "blue"]}, "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}})),
    ("a shopping list", obj({"items": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 4}})),
    ("a point", obj({"x": {"type": "number", "minimum": -100, "maximum": 100},
                     "y": {"type": "number", "minimum": -100, "maximum": 100}})),
    ("an address", obj({"street": NAME, "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    ("a user with an address", obj({"name": NAME, "address": obj({"city": NAME, "country": NAME})})),
    ("a team", obj({"team": NAME, "members": {"type": "array", "maxItems": 3, "items": obj({"name": NAME,
                                                                                         "role": NAME})}})),
    ("a task", obj({"title": NAME, "done": {"type": "boolean"}, "priority": {"enum": [1, 2, 3]}})),
    ("a product", obj({"name": NAME, "price": {"type": "number", "minimum": 0, "maximum": 1000},
                       "tags": {"type": "array", "items": {"enum": ["new", "sale", "popular"]}, "maxItems": 3}})),
    ("an event", obj({"name": NAME, "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}})),
    ("a movie", obj({"title": NAME, "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                     "genre": {"enum": ["drama", "comedy", "action"]}})),
    ("a reply that may have no value", obj({"value": {"anyOf": [{"type": "integer", "maximum": 999, "minimum": 0},
                                                                {"type": "null"}]}})),
    ("a pancake recipe", obj({"dish": NAME, "steps": {"type": "array", "minItems": 1, "maxItems": 3,
                                                      "items": {"type": "string", "pattern": "^[A-Za-z ,.]{1,30}$"}}})),
    ("a weather report", obj({"city": NAME, "temperature": {"type": "integer", "minimum": -50, "maximum": 50},
                              "unit": {"const": "celsius"}})),
    ("a matrix", obj({"rows": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2,
                                                                        "items": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 9}}}})),
    ("a contact", obj({"name": NAME, "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
                       "phone": {"type": "string", "maxLength": 12}}, required=["name", "email"])),
    ("a pet", {"$defs": {"owner": obj({"name": NAME})},
               **obj({"name": NAME, "species": {"enum": ["cat", "dog"]}, "owner": {"$ref": "#/$defs/owner"}})}),
    ("a shape", obj({"shape": {"oneOf": [obj({"kind": {"const": "circle"}, "radius": {"type": "integer",
                                                                                    "minimum": 1, "maximum": 99}}),
                                         obj({"kind": {"const": "square"}, "side": {"type": "integer",
                                                                                  "minimum": 1, "maximum": 99}})]}})),
]
MAX_NEW = 160


def params(schema: dict, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=MAX_NEW, structured=StructuredOutput(json=schema), **kw)


def assert_valid(texts: list[str], which: list[int], what: str) -> None:
    for text, (thing, schema) in zip(texts, [SCHEMAS[i] for i in which]):
        assert text.startswith("{"), (what, thing, text)
        jsonschema.validate(json.loads(text), schema)


@pytest.fixture(scope="module")
def llm():
    return LLM(quant="q4")


@pytest.fixture(scope="module")
def prompts(llm):
    return [llm.encode([{"role": "user", "content": f"Write {thing} as JSON."}]) for thing, _ in SCHEMAS]


def generate(llm, prompts, spec: SpecConfig, which: list[int], **kw):
    """One batch: the prompts of the schemas `which`, each under its schema."""
    ids = [llm.engine.add_request(prompts[i], params(SCHEMAS[i][1], **kw), spec) for i in which]
    done = {}
    while len(done) < len(ids):
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out.generations
    return [done[i] for i in ids]


EVERY = list(range(len(SCHEMAS)))


@pytest.fixture(scope="module")
def reference(llm, prompts):
    """ar's greedy outputs, all valid and all complete."""
    out = generate(llm, prompts, SpecConfig(method="ar"), EVERY)
    assert all(g[0].finish_reason in ("stop", "eos") for g in out)
    assert_valid([g[0].text for g in out], EVERY, "ar")
    return [g[0].token_ids for g in out]


@pytest.mark.parametrize("method", methods())
def test_every_method_writes_what_ar_writes(llm, prompts, reference, tmp_path, method):
    which = EVERY[methods().index(method) % 4::4]
    spec = specs_for(method, datastore_for(llm, tmp_path))[1]
    install_drafters(llm, [spec], llm.runtime)
    out = generate(llm, prompts, spec, which)
    assert [g[0].token_ids for g in out] == [reference[i] for i in which]
    assert_valid([g[0].text for g in out], which, method)


def test_every_sample_is_valid_json(llm, prompts):
    out = generate(llm, prompts, SpecConfig(method="pld"), EVERY, n=2, temperature=0.8, seed=7)
    for i in range(2):
        assert_valid([g[i].text for g in out], EVERY, f"sample {i}")

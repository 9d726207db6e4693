"""Structured outputs below the engine: constraints compile (and bad ones say why), a draft tree's
masks are each node's own path's, tool calls are written and read in both formats."""
import json
import random

import pytest
import torch
from llguidance.torch import fill_next_token_bitmask

from helpers_structured import JSON_PIECES, char_tokenizer
from forerun.config import SamplingParams, StructuredOutput
from forerun.structured import Grammars
from forerun.structured.grammar import check_constraint
from forerun.structured.tools import Tool, ToolStream, call_grammar, parse_tool_calls
from forerun.tree import Tree

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tags": {"type": "array", "items": {"enum": ["ab", "cd"]}}},
          "required": ["name", "age", "tags"]}
VOCAB = 64


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(JSON_PIECES)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, VOCAB)


def accepts(grammars, spec: StructuredOutput, text: str, tokenizer) -> bool:
    matcher = grammars.processor(spec).matcher
    ids = tokenizer.encode(text, add_bos=False)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def test_a_constraint_is_exactly_one_of_its_kinds():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(regex="a+", choice=["a"])
    with pytest.raises(ValueError):
        StructuredOutput(json="{not json")
    with pytest.raises(ValueError, match="non-empty"):
        StructuredOutput(choice=[])
    assert StructuredOutput(json={"type": "object"}) == StructuredOutput(json='{"type": "object"}')
    assert SamplingParams(structured=StructuredOutput(json_object=True)).structured.kind == "json_object"


@pytest.mark.parametrize("spec, problem", [
    (StructuredOutput(regex="(("), "unclosed group"),
    (StructuredOutput(grammar="start: missing"), "missing"),
    (StructuredOutput(json={"type": "frob"}), "frob"),
    (StructuredOutput(grammar='root ::= "a" [b'), "neither Lark nor GBNF"),
    (StructuredOutput(grammar='x ::= "a"'), "no 'root' rule|neither Lark nor GBNF"),
    (StructuredOutput(grammar=" "), "neither Lark nor GBNF"),  # the fuzzer's: a 500 before
], ids=["regex", "lark", "schema", "gbnf", "gbnf-without-root", "blank"])
def test_a_bad_constraint_is_refused_with_its_reason(grammars, spec, problem):
    with pytest.raises(ValueError, match=problem):
        check_constraint(spec)
    with pytest.raises(ValueError, match=problem):
        grammars.processor(spec)


def test_each_kind_accepts_its_sentences_only(grammars, tokenizer):
    cases = [(StructuredOutput(json=SCHEMA), '{"name": "bob", "age": 12, "tags": ["ab"]}', '{"name": "bob"}'),
             (StructuredOutput(json_object=True), '{"x": [1, 2]}', "[1, 2]"),
             (StructuredOutput(regex=r"[a-c]+-\d{2}"), "abc-12", "abc-1"),
             (StructuredOutput(choice=["yes", "no", 'say "x"']), 'say "x"', "yesno"),
             (StructuredOutput(grammar='root ::= "a" digits\ndigits ::= [0-9]+'), "a123", "a"),
             (StructuredOutput(grammar='start: "b" /[0-9]+/'), "b9", "9")]
    for spec, good, bad in cases:
        assert accepts(grammars, spec, good, tokenizer), (spec.kind, good)
        assert not accepts(grammars, spec, bad, tokenizer), (spec.kind, bad)


def random_tree(rng: random.Random, valid: list[list[int]], size: int) -> Tree:
    """A tree whose nodes mostly extend their parent's path along one of `valid` (token sequences the
    grammar allows), and sometimes take a random token."""
    tokens, parents, paths = [5], [-1], [[]]
    for _ in range(size - 1):
        parent = rng.randrange(len(tokens))
        path = paths[parent]
        followers = [v[len(path)] for v in valid if v[:len(path)] == path and len(v) > len(path)]
        token = rng.choice(followers) if followers and rng.random() < 0.8 else rng.randrange(VOCAB)
        tokens.append(token)
        parents.append(parent)
        paths.append(path + [token])
    return Tree(tokens=torch.tensor(tokens), parents=parents)


def path_mask(grammars, spec, committed: list[int], path: list[int]) -> torch.Tensor | None:
    """[V] bool: what a fresh matcher allows after committed + path, or None if the path breaks it."""
    processor = grammars.processor(spec)
    matcher = processor.matcher
    if matcher.try_consume_tokens(committed + path) < len(committed + path):
        return None
    bits = torch.zeros(1, processor.words, dtype=torch.int32)
    fill_next_token_bitmask(matcher, bits, 0)
    return ((bits[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()[:VOCAB]


@pytest.mark.parametrize("seed", range(3))
def test_every_node_is_masked_by_its_own_path(grammars, tokenizer, seed):
    rng = random.Random(seed)
    spec = StructuredOutput(json=SCHEMA)
    texts = ['{"name": "ab", "age": 12, "tags": ["cd", "ab"]}', '{"name": "", "age": 7, "tags": []}']
    committed = tokenizer.encode('{"na', add_bos=False)
    valid = [tokenizer.encode(t, add_bos=False)[len(committed):] for t in texts]
    processor = grammars.processor(spec)
    processor.commit(committed)
    tree = random_tree(rng, valid, 40)
    masked = processor.apply(torch.zeros(tree.size, VOCAB), tree)
    reachable = processor.reachable(tree)
    tokens = tree.tokens.tolist()
    for node in range(tree.size):
        path, at = [], node
        while at:
            path.insert(0, tokens[at])
            at = tree.parents[at]
        want = path_mask(grammars, spec, committed, path)
        assert (want is not None) == (node in reachable), node
        if want is not None:
            assert torch.equal(masked[node] == 0, want), node
    assert 1 < len(reachable) < tree.size  # both kinds of node were drawn


def test_a_finished_grammar_admits_only_the_end(grammars, tokenizer):
    processor = grammars.processor(StructuredOutput(choice=["ab", "abc"]))
    processor.commit(tokenizer.encode("ab", add_bos=False))
    assert not processor.finished  # "abc" may follow
    processor.commit(tokenizer.encode("c", add_bos=False))
    assert processor.finished
    row = processor.apply(torch.zeros(1, VOCAB), Tree(tokens=torch.tensor([3]), parents=[-1]))[0]
    assert (row == 0).nonzero().flatten().tolist() == [0]  # EOS alone
    fork = processor.fork()
    with pytest.raises(RuntimeError, match="breaks the grammar"):
        fork.commit([5])


WEATHER = Tool("get_weather", "Weather of a city", {"type": "object", "properties": {"city": {"type": "string"}},
                                                    "required": ["city"]})
TIME = Tool("get_time", "", {"type": "object", "properties": {}})


def test_tool_calls_are_read_in_both_formats():
    names = {"get_weather", "get_time"}
    smol = 'Sure. <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
           '{"name": "get_time", "arguments": {}}]</tool_call>'
    content, calls = parse_tool_calls(smol, names)
    assert content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    hermes = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>\n' \
             '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_tool_calls(hermes, names)
    assert content is None and [c.name for c in calls] == ["get_time", "get_weather"]
    assert len({c.id for c in calls}) == 2
    unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert parse_tool_calls(unknown, names) == (unknown, [])


def test_a_streamed_reply_holds_back_what_may_be_a_call():
    stream = ToolStream({"get_time"})
    pieces = ["Let me ", "check. <tool", "_call>[{\"name\": \"get_time\", ", "\"arguments\": {}}]</tool_call>"]
    out = [stream.feed(p) for p in pieces]
    assert out == ["Let me ", "check. ", "", ""]
    content, calls = stream.finish()
    assert content == "" and [c.name for c in calls] == ["get_time"]
    plain = ToolStream({"get_time"})
    assert plain.feed("a <to") == "a " and plain.feed("y") == "<toy" and plain.finish() == ("", [])


CALLS = {"smollm2": '<tool_call>[{"name": "get_weather", "arguments": {"city": "Pa\\"ris", "days": [1, {"a": 2}]}}, '
                   '{"name": "get_time"}]</tool_call>',
         "hermes": '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>\n'
                   '{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>'}


@pytest.mark.parametrize("form", CALLS)
@pytest.mark.parametrize("piece", [1, 3, 7])
def test_live_calls_stream_their_arguments_as_written_and_reassemble_to_the_parsed_calls(form, piece):
    text = CALLS[form]
    stream, deltas = ToolStream({"get_weather", "get_time"}, live=True), []
    for i in range(0, len(text), piece):
        assert stream.feed(text[i:i + piece]) == ""
        deltas.append(stream.call_deltas())
    content, calls = stream.finish()
    deltas.append(stream.call_deltas())
    assert content == ""
    joined = {}
    for part in (p for step in deltas for d in step for p in d["tool_calls"]):
        entry = joined.setdefault(part["index"], {"id": part.get("id"), "name": "", "arguments": ""})
        entry["name"] += part["function"].get("name", "")
        entry["arguments"] += part["function"]["arguments"]
    assert [(e["id"], e["name"], e["arguments"]) for e in joined.values()] == [(c.id, c.name, c.arguments) for c in calls]
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in parse_tool_calls(text, {"get_weather", "get_time"})[1]]
    assert all(json.loads(c.arguments) is not None for c in calls)
    if form == "smollm2" and piece == 1:  # the first call's arguments came a character at a time, before the call ended
        assert sum(1 for step in deltas[:-1] for d in step if d["tool_calls"][0]["index"] == 0) > 10


@pytest.mark.parametrize("one_per_tag", [False, True], ids=["smollm2", "hermes"])
def test_the_call_grammar_admits_calls_of_the_tools_only(one_per_tag):
    tokenizer = char_tokenizer([*JSON_PIECES, "<", ">", "/", "_", "\n", "P"])
    grammars = Grammars(tokenizer, 80)
    required = call_grammar([WEATHER, TIME], one_per_tag)
    named = call_grammar([TIME], one_per_tag, single=True)
    weather = {"name": "get_weather", "arguments": {"city": "P"}}
    time_call = {"name": "get_time", "arguments": {}}

    def written(*calls):
        if one_per_tag:
            return "".join(f"<tool_call>{json.dumps(c)}</tool_call>" for c in calls)
        return f"<tool_call>{json.dumps(list(calls))}</tool_call>"

    assert accepts(grammars, required, written(weather, time_call), tokenizer)
    assert not accepts(grammars, required, written({"name": "get_date", "arguments": {}}), tokenizer)
    assert not accepts(grammars, required, written({"name": "get_weather", "arguments": {}}), tokenizer)
    assert not accepts(grammars, required, "hello", tokenizer)
    assert accepts(grammars, named, written(time_call), tokenizer)
    assert not accepts(grammars, named, written(weather), tokenizer)
    assert not accepts(grammars, named, written(time_call, time_call), tokenizer)
    auto = call_grammar([WEATHER, TIME], one_per_tag, optional=True)
    assert accepts(grammars, auto, "hello", tokenizer) and accepts(grammars, auto, "", tokenizer)
    assert accepts(grammars, auto, "P\n" + written(weather) + "\nP", tokenizer)
    assert not accepts(grammars, auto, "P" + written({"name": "get_date", "arguments": {}}), tokenizer)
    assert not accepts(grammars, auto, written({"name": "get_weather", "arguments": {}}), tokenizer)
    assert accepts(grammars, auto, written(weather) + written(time_call), tokenizer) == one_per_tag
    single = call_grammar([WEATHER, TIME], one_per_tag, single=True, optional=True)
    assert accepts(grammars, single, written(weather), tokenizer)
    assert not accepts(grammars, single, written(weather, time_call), tokenizer)


def test_the_cli_flags_map_onto_one_constraint(tmp_path):
    from forerun.cli import build_parser, sampling_params

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    parser = build_parser()
    params = sampling_params(parser.parse_args(["generate", "hi", "--json-schema", str(schema)]))
    assert json.loads(params.structured.json) == SCHEMA
    params = sampling_params(parser.parse_args(["generate", "hi", "--choice", "yes", "--choice", "no"]))
    assert params.structured.choice == ("yes", "no")
    assert sampling_params(parser.parse_args(["generate", "hi"])).structured is None
    with pytest.raises(ValueError, match="exactly one"):
        sampling_params(parser.parse_args(["generate", "hi", "--regex", "a+", "--json-object"]))


def test_a_vocabulary_llguidance_cannot_read_is_a_clear_error():
    import tokenizers
    from tokenizers import models

    from forerun.models.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(models.BPE(vocab={"</s>": 0, "a": 1}, merges=[]))  # no decoder
    with pytest.raises(ValueError, match="cannot read this model's vocabulary"):
        Grammars(Tokenizer(backend, {"eos_token": "</s>"}), 2)


def test_a_choice_the_grammar_library_cannot_follow_is_refused_before_it_runs(tmp_path):
    """llguidance's mask once allowed a token its parser then refused (a choice holding U+A7A0B, an
    unassigned code point, under SmolLM2's byte-level vocabulary), which failed the request mid-step
    with a 500. Each choice must be writable as the model tokenizes it: else a ValueError (a 400) when
    the request is added; emoji and accented text are fine."""
    from helpers_serve import tiny_model_dir
    from forerun.models.runtime import load

    runtime = load(str(tiny_model_dir(tmp_path / "model")))
    grammars = Grammars(runtime.tokenizer, runtime.model.args.vocab_size)
    with pytest.raises(ValueError, match="choice 1 cannot be written"):
        grammars.processor(StructuredOutput(choice=["yes", "\U000a7a0b\x17"]))
    for fine in ("👍 yes", "café", "\x17 control"):
        grammars.processor(StructuredOutput(choice=[fine, "no"]))

"""Tool calling: the tools shown to the model, the grammar that makes it call one, and the calls read
back out of its text.

Two formats of call, both inside <tool_call> tags: SmolLM2's, a JSON list of calls in one tag
(what forerun writes into the system prompt of a chat template that does not render tools itself),
and Hermes' (Qwen 2.5, Hermes, ...), one JSON call per tag (what templates that render `tools` ask
for). The parser reads either: a tag holds an object or a list of objects, each
{"name": ..., "arguments": {...}}.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from forerun.config import StructuredOutput
from forerun.structured.grammar import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)

# SmolLM2's function-calling system prompt (its model card), with the tools in place of {tools}.
SMOLLM2_TOOLS_PROMPT = """You are an expert in composing functions. You are given a question and a set of possible \
functions. Based on the question, you will need to make one or more function/tool calls to achieve the purpose. \
If none of the functions can be used, point it out and refuse to answer. If the given question lacks the parameters \
required by the function, also point it out.

You have access to the following tools:
<tools>{tools}</tools>

The output MUST strictly adhere to the following format, and NO other text MUST be included.
The example format is as follows. Please make sure the parameter type is correct. If no function call is needed, \
please make the tool calls an empty list '[]'.
<tool_call>[
{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},
... (more tool calls as required)
]</tool_call>"""


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call: its name, what it does, and its arguments' JSON schema."""

    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'  # JSON schema text (a dict is accepted)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a tool needs a name")
        if not isinstance(self.parameters, str):
            object.__setattr__(self, "parameters", json.dumps(self.parameters))
        if not isinstance(json.loads(self.parameters), dict):
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema object")

    def as_openai(self) -> dict:
        """The tool as OpenAI's `tools` list holds it (what chat templates that render tools read)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": json.loads(self.parameters)}}


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def tools_prompt(tools: list[Tool]) -> str:
    """SmolLM2's system prompt listing `tools`."""
    return SMOLLM2_TOOLS_PROMPT.format(tools=json.dumps([t.as_openai()["function"] for t in tools]))


def call_grammar(tools: list[Tool], one_per_tag: bool, single: bool = False) -> StructuredOutput:
    """A grammar whose every sentence calls tools (tool_choice "required", or a named tool: pass only
    it and single=True): SmolLM2's list in one tag, or with one_per_tag Hermes' tags of one call each."""
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)}} for t in tools]
    call = {"anyOf": calls} if len(calls) > 1 else calls[0]
    if one_per_tag:
        body = json.dumps({**call, "x-guidance": JSON_OPTIONS})
        lark = f'start: {"tagged" if single else "tagged+"}\ntagged: {json.dumps(OPEN)} call {json.dumps(CLOSE)}\n' \
               f"call: %json {body}"
    else:
        listed = {"type": "array", "items": call, "minItems": 1, "x-guidance": JSON_OPTIONS}
        if single:
            listed["maxItems"] = 1
        lark = f"start: {json.dumps(OPEN)} calls {json.dumps(CLOSE)}\ncalls: %json {json.dumps(listed)}"
    return StructuredOutput(grammar=lark)


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """The text outside <tool_call> tags (None when empty) and the calls in them, of the tools named
    in `names`. A tag that does not hold calls of known tools is left in the text, unparsed: the
    model wrote something else, and the client sees it as content."""
    calls, kept, last = [], [], 0
    for match in _CALL.finditer(text):
        parsed = _calls_in(match.group(1), names)
        if parsed is None:
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls += parsed
    kept.append(text[last:])
    content = "".join(kept).strip()
    return content or None, calls


def _calls_in(body: str, names: set[str]) -> list[ToolCall] | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not (isinstance(item, dict) and item.get("name") in names and isinstance(item.get("arguments", {}), dict)):
            return None
        out.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", item["name"], json.dumps(item.get("arguments", {}))))
    return out


class ToolStream:
    """A streamed reply's text, split into content handed out as it comes and tool calls handed out
    at the end: text is held back while it may be the start of a <tool_call> tag, and from the first
    tag on everything is kept for the parser."""

    def __init__(self, names: set[str]):
        self.names = names
        self.held = ""  # text not handed out yet
        self.calling = False  # a tag has opened: the rest waits for the end

    def feed(self, text: str) -> str:
        """The content of `text` that can be handed out now."""
        self.held += text
        if self.calling:
            return ""
        start = self.held.find(OPEN)
        if start >= 0:
            self.calling = True
            out, self.held = self.held[:start], self.held[start:]
            return out
        keep = _partial_tag(self.held)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content still held (text after the calls, or tags that were not calls) and the calls."""
        content, calls = parse_tool_calls(self.held, self.names) if self.calling else (self.held, [])
        return content or "", calls


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` could begin a <tool_call> tag."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0

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


def call_grammar(tools: list[Tool], one_per_tag: bool, single: bool = False, optional: bool = False
                 ) -> StructuredOutput:
    """A grammar of tool calls: SmolLM2's list in one tag, or with one_per_tag Hermes' tags of one call
    each, every call of one of `tools` with arguments valid against its schema. By default every
    sentence is calls (tool_choice "required", or a named tool: pass only it and single=True). With
    `optional` (tool_choice "auto") any text is allowed around the calls, but a <tool_call> tag the model
    opens must hold valid calls (the text before a tag is llguidance's lazy lexeme)."""
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)}} for t in tools]
    call = {"anyOf": calls} if len(calls) > 1 else calls[0]
    if one_per_tag:
        body = f"%json {json.dumps({**call, 'x-guidance': JSON_OPTIONS})}"
    else:
        listed = {"type": "array", "items": call, "minItems": 1, "x-guidance": JSON_OPTIONS}
        if single:
            listed["maxItems"] = 1
        body = f"%json {json.dumps(listed)}"
    if not optional:
        tags = "tagged" if single or not one_per_tag else "tagged+"
        return StructuredOutput(grammar=f"start: {tags}\ntagged: {json.dumps(OPEN)} calls {json.dumps(CLOSE)}\n"
                                        f"calls: {body}")
    tags = "tagged?" if single or not one_per_tag else "tagged*"
    # TEXT never holds a tag, so past the calls allowed no further tag opens as text
    return StructuredOutput(grammar=f"start: {tags} TEXT\ntagged: before calls {json.dumps(CLOSE)}\n"
                                    f"before[lazy]: TEXT {json.dumps(OPEN)}\n"
                                    f"TEXT: /(?s:.*)/ & ~/(?s:.*){OPEN}(?s:.*)/\ncalls: {body}")


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
    """The calls in one tag's body, each call's arguments as the model wrote them (what a stream hands
    out piece by piece), or None where the body is not calls of known tools."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, dict) and item.get("name") in names and isinstance(item.get("arguments", {}), dict)
               for item in items):
        return None
    scanner = CallScanner()
    scanner.feed(OPEN + body + CLOSE)
    written = scanner.finished()
    out = []
    for k, item in enumerate(items):
        arguments = item.get("arguments", {})
        raw = written[k].arguments if len(written) == len(items) else None
        if raw is None or written[k].name != item["name"] or _loads(raw) != arguments:
            raw = json.dumps(arguments)
        out.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", item["name"], raw))
    return out


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


class ToolStream:
    """A streamed reply's text, split into content handed out as it comes and tool calls. Text is held
    back while it may be the start of a <tool_call> tag. From the first tag on, everything is kept for
    the parser and the calls are handed out at the end, unless the calls are `live`: a grammar makes
    every tag the model opens hold valid calls (call_grammar), so nothing streamed can turn out not to
    be a call, and each call is handed out as OpenAI streams it (its id and name once the name has
    closed, then its arguments' text piece by piece as the model writes it)."""

    def __init__(self, names: set[str], live: bool = False):
        self.names = names
        self.held = ""  # text not handed out yet
        self.calling = False  # a tag has opened: the rest waits for the end
        self.scanner = CallScanner() if live else None
        self.sent: list[int] = []  # per call whose header went out: the characters of its arguments handed out
        self.done: list[ToolCall] = []

    def feed(self, text: str) -> str:
        """The content of `text` that can be handed out now."""
        self.held += text
        if self.calling:
            if self.scanner is not None:
                self.scanner.feed(text)
            return ""
        start = self.held.find(OPEN)
        if start >= 0:
            self.calling = True
            out, self.held = self.held[:start], self.held[start:]
            if self.scanner is not None:
                self.scanner.feed(self.held)
            return out
        keep = _partial_tag(self.held)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def call_deltas(self) -> list[dict]:
        """The `tool_calls` deltas that have become known since the last call of this: live, as the
        calls are written; otherwise all of them once finish() has read them."""
        if self.scanner is not None:
            known = []
            for c in self.scanner.calls:  # a call's header goes out once its name and arguments have begun
                if c.name is None or (c.arguments_start is None and not c.closed):
                    break
                known.append((c.id, c.name, self.scanner.arguments(c)))
        else:
            known = [(c.id, c.name, c.arguments) for c in self.done]
        out = []
        for index, (call_id, name, args) in enumerate(known):
            if index == len(self.sent):
                out.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
                self.sent.append(0)
            if len(args) > self.sent[index]:
                out.append({"tool_calls": [{"index": index, "function": {"arguments": args[self.sent[index]:]}}]})
                self.sent[index] = len(args)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content still held (text between and after the calls, or tags that were not calls) and
        the calls."""
        if not self.calling:
            return self.held, []
        content, self.done = parse_tool_calls(self.held, self.names)
        if self.scanner is not None and self.done:
            self.done = [c for c in self.scanner.finished() if c.name in self.names]  # the ids already sent
        return content or "", self.done


@dataclass(slots=True)
class _Reading:
    """A call object being read: its name (once its string has closed) and its arguments' span."""

    id: str
    name: str | None = None
    arguments_start: int | None = None
    arguments_end: int | None = None
    closed: bool = False


class CallScanner:
    """Reads the calls in <tool_call> tags as their text grows, one character at a time: each call
    object (the tag's JSON object, or each object of the tag's JSON list), its "name" once the string
    has closed, and where the raw text of its "arguments" value starts and ends. It tracks JSON
    structure only (strings, nesting, keys of the call object); whether the text is a valid call is the
    grammar's business (live calls) or the parser's (parse_tool_calls)."""

    def __init__(self):
        self.text = ""
        self.pos = 0  # the next character to read
        self.in_tag = False
        self.stack: list[str] = []  # the containers open inside the tag
        self.string_start: int | None = None  # inside a string: where it began
        self.escaped = False
        self.level = 0  # len(stack) inside the current call object
        self.key: str | None = None  # the call object's member being read
        self.expect_key = False
        self.value_pending = False  # after "arguments": its value has not begun
        self.calls: list[_Reading] = []

    def feed(self, text: str) -> None:
        self.text += text
        self._scan()

    def arguments(self, call: _Reading) -> str:
        """The arguments' text as far as it has come (whole once the value has ended; "{}" for a call
        that closed without any)."""
        if call.arguments_start is None:
            return "{}" if call.closed else ""
        end = call.arguments_end if call.arguments_end is not None else len(self.text)
        return self.text[call.arguments_start:end].rstrip()

    def finished(self) -> list[ToolCall]:
        """The calls whose objects closed, with their arguments ("{}" where none were given)."""
        return [ToolCall(c.id, c.name, self.arguments(c)) for c in self.calls
                if c.closed and c.name is not None]

    def _scan(self) -> None:
        text = self.text
        while self.pos < len(text):
            i = self.pos
            if not self.in_tag:
                start = text.find(OPEN, i)
                if start < 0:
                    self.pos = max(i, len(text) - len(OPEN) + 1)
                    return
                self.in_tag, self.stack, self.pos = True, [], start + len(OPEN)
                continue
            c = text[i]
            if self.string_start is not None:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self._string_closed(text[self.string_start:i + 1], i)
                    self.string_start = None
                self.pos = i + 1
                continue
            if not self.stack and c == "<":
                if not text.startswith(CLOSE, i):
                    if CLOSE.startswith(text[i:]):
                        return  # perhaps the closing tag: wait for more text
                else:
                    self.in_tag, self.pos = False, i + len(CLOSE)
                    continue
            at_call = bool(self.calls) and not self.calls[-1].closed and len(self.stack) == self.level
            if at_call and self.value_pending and not c.isspace():
                self.calls[-1].arguments_start, self.value_pending = i, False
            if c == '"':
                self.string_start = i
            elif c in "{[":
                if c == "{" and self.stack in ([], ["["]):
                    self.calls.append(_Reading(f"call_{uuid.uuid4().hex[:24]}"))
                    self.level, self.expect_key, self.key = len(self.stack) + 1, True, None
                self.stack.append(c)
            elif c in "}]":
                if at_call and self.key == "arguments":
                    self._end_arguments(i)
                if self.stack:
                    self.stack.pop()
                if c == "}" and self.calls and not self.calls[-1].closed and len(self.stack) == self.level - 1:
                    self.calls[-1].closed = True
                elif len(self.stack) == self.level and self.key == "arguments":
                    self._end_arguments(i + 1)
            elif at_call and c == ",":
                if self.key == "arguments":
                    self._end_arguments(i)
                self.expect_key = True
            elif at_call and c == ":":
                self.value_pending = self.key == "arguments"
            self.pos = i + 1

    def _string_closed(self, literal: str, end: int) -> None:
        if not self.calls or self.calls[-1].closed or len(self.stack) != self.level:
            return
        try:
            value = json.loads(literal)
        except json.JSONDecodeError:
            return
        if self.expect_key:
            self.key, self.expect_key = value, False
        elif self.key == "name":
            self.calls[-1].name = value
        elif self.key == "arguments":
            self._end_arguments(end + 1)

    def _end_arguments(self, end: int) -> None:
        call = self.calls[-1]
        if call.arguments_start is not None and call.arguments_end is None:
            call.arguments_end = end


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` could begin a <tool_call> tag."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0

"""The OpenAI request bodies the server accepts, as pydantic models. Fields a client may send that
forerun does not use and that change nothing in the output (`user`, `metadata`, `store`, ...) are
ignored (pydantic's default), as vLLM does; fields that would change the output in a way forerun
cannot honour (suffix, content parts other than text, ...) are rejected with a 400 naming the field,
rather than ignored: a client that asked for something must not get something else back silently."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20
MAX_N = 128
MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM any number. Each step searches them all
MAX_STOP_CHARS = 256  # per stop string: the text held back from a stream while it may start one
MAX_BAD_WORDS = 64  # each is matched against every draft node's path
MAX_LOGIT_BIAS = 1024  # tokens biased (OpenAI allows any number; each is a column written per step)
ROLES = ("system", "user", "assistant", "developer", "tool")  # OpenAI's (developer: system, for newer models)


class RequestBody(BaseModel):
    """A request body. Every string in it, the fields forerun reads and those it ignores, keys
    too, must be valid Unicode: JSON may escape a lone UTF-16 surrogate ("\\ud800"), which Python's
    json accepts but no tokenizer, chat template or UTF-8 encoder does."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        where = _lone_surrogate_at(data)
        if where is not None:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate, which is not valid Unicode")
        return data


def _lone_surrogate_at(data) -> str | None:
    """Where in parsed JSON (a dotted path, or "the body") a string or key holds a lone surrogate.
    Walked with a stack of its own: a deeply nested body must not exhaust the recursion limit."""
    stack = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and not _is_unicode(value):
            return path or "the body"
        if isinstance(value, dict):
            for key, item in value.items():
                if not _is_unicode(key):
                    return f"a key in {path or 'the body'}"
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(value)
                         if isinstance(item, (str, dict, list)))
    return None


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class StreamOptions(BaseModel):
    include_usage: bool = False


class Speculation(BaseModel):
    """Overrides the server's speculative decoding for one request (in `extra_body`). Its draft
    model may be one the server allows (forerun.serve.drafts); method options, which may name files,
    come only from the server's own flags. Unlike the body, unknown fields here are an error."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = None
    draft_model: str | None = Field(None, max_length=4096)  # a path the server allows, as its operator gave it
    num_draft: int | None = Field(None, ge=1, le=64)
    max_draft: int | None = Field(None, ge=1, le=64)
    adaptive: bool | None = None
    budget: Literal["fixed", "goodput"] | None = None
    guard: bool | None = None
    exit_layer: int | None = Field(None, ge=1)
    tree_width: int | None = Field(None, ge=1, le=8)
    forced_tokens: bool | None = None
    ngram_min: int | None = Field(None, ge=1, le=16)
    ngram_max: int | None = Field(None, ge=1, le=16)


class Scaling(BaseModel):
    """Inference-time scaling for one chat request (in `extra_body`): a strategy of forerun.scaling
    answers with the chosen one of its samples. Unlike the body, unknown fields here are an error."""

    model_config = ConfigDict(extra="forbid")

    strategy: str
    n: int = Field(ge=1, le=MAX_N)  # the strategy's budget: samples, particles, continuations per round
    reward: str | None = None  # the scorer, for the strategies that score
    task: str | None = None  # whose answer extraction to vote on (default: the last number or \boxed{})
    options: dict[str, float | int | bool | str | None] = Field(default_factory=dict)  # the strategy's own
    # between solution steps, for step-level strategies: a stop string of each step's requests
    delimiter: str = Field("\n\n", min_length=1, max_length=MAX_STOP_CHARS)
    max_steps: int = Field(8, ge=1, le=64)  # a step-level strategy finishes its branches on this step


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (in `extra_body`): one constraint on every sample. Unlike the
    body, unknown fields here are an error."""

    model_config = ConfigDict(extra="forbid")

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)
    json_object: bool | None = None


class JsonSchemaFormat(BaseModel):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type 'json_schema', and only then")
        return self


class FunctionDef(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """tool_choice naming the one function the model must call."""

    type: Literal["function"]
    function: NamedFunction


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallMessage(BaseModel):
    """A call in an assistant message of the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TemplateOptions(BaseModel):
    """How the chat template renders `messages` (vLLM's extras): with the assistant's turn opened
    (default), after the last message's turn, or inside a final assistant message, which the model
    then continues."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _continue_without_generation_prompt(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt: false (the final message is "
                             "continued, not answered)")
        return self


class SamplingFields(RequestBody):
    """Fields completions and chat share."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)  # token id (as text) -> bias
    # extras (vLLM's names), sent through the client's extra_body
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] | None = None
    speculation: Speculation | str | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int | None = Field(None, ge=0)
    bad_words: list[str] | None = Field(None, max_length=MAX_BAD_WORDS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's: each prompt token's, top n
    # structured outputs (vLLM's names; see forerun.serve.requests.structured_output)
    guided_json: dict | str | None = None
    guided_regex: str | None = Field(None, min_length=1)
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = Field(None, min_length=1)
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available with stream (as in vLLM); ask without streaming")
        return self

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(strings)}")
        if any(len(s) > MAX_STOP_CHARS for s in strings):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return stop

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: the prompt back (with its logprobs), no new tokens
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # samples to choose the n best of (cumulative logprob)

    @model_validator(mode="after")
    def _no_insertion(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it is only allowed with echo (to score the prompt)")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by forerun")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of > n cannot be streamed (as in OpenAI's API): the best are known at the end")
        return self


class TextPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal[ROLES]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool's result answers this call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"message content of type {part.type!r} is not supported; send text parts")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(SamplingFields, TemplateOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    scaling: Scaling | None = None  # extra_body
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # false: at most one call per reply (enforced for required and named)
    echo: bool = False

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.echo:
            raise ValueError("echo is not supported on chat completions; use /v1/completions with echo")
        if self.scaling is not None and self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not available with scaling")
        return self

    @property
    def completion_limit(self) -> int | None:
        """max_completion_tokens, or the older max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(RequestBody, TemplateOptions):  # the template options apply to messages, as in chat completions
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, which every error of the server has."""

    error: ErrorDetail

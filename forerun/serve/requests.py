"""From an OpenAI request body to what the engine takes: prompt ids, SamplingParams, SpecConfig.
Every problem is an APIError (400 or 404) raised before anything is queued."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from forerun.config import GenerationDefaults, SamplingParams, SpecConfig, StructuredOutput
from forerun.engine.engine import Engine
from forerun.engine.kv_pool import KVPool
from forerun.serve.errors import APIError, bad_request
from forerun.serve.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, NamedToolChoice,
                                    SamplingFields, Speculation, TemplateOptions)
from forerun.structured.grammar import check_constraint
from forerun.structured.tools import CLOSE, OPEN, Tool, call_grammar, tools_prompt

MAX_PROMPTS = 64  # prompts in one completions request
GREEDY_BELOW = 1e-5  # a temperature this low is greedy decoding (dividing logits by it overflows)
TEMPLATE_ROLE = {"developer": "system"}  # OpenAI's newer name; chat templates know the older one


@dataclass(frozen=True, slots=True)
class Served:
    """What the checks need of the served model. All of it is fixed once the model has loaded, so
    the event loop reads it beside the engine thread."""

    tokenizer: object  # forerun.models.tokenizer.Tokenizer
    context: int  # tokens, prompt and completion together
    vocab_size: int
    pool: KVPool  # only its size is read: num_blocks, block_size
    max_num_seqs: int  # sequences the engine decodes at once
    defaults: GenerationDefaults  # for the sampling fields a request leaves unset

    @classmethod
    def of(cls, engine: Engine, generation_config: str = "auto") -> "Served":
        """generation_config "auto": requests default to the model's generation_config.json; "none"
        (or vLLM's "vllm"): to OpenAI's defaults; a folder: to its generation_config.json."""
        defaults = GenerationDefaults.chosen(generation_config, engine.runtime.generation)
        return cls(engine.runtime.tokenizer, engine.context_length, engine.model.args.vocab_size,
                   engine.pool, engine.config.max_num_seqs, defaults)


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"the model `{requested}` does not exist; this server serves `{served}`",
                       param="model", code="model_not_found")


def completion_prompts(prompt: str | list, served: Served) -> list[list[int]]:
    """Token ids of each prompt: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [served.tokenizer.encode(prompt)]
    if not prompt:
        raise bad_request("prompt is empty", param="prompt")
    if len(prompt) > MAX_PROMPTS and not isinstance(prompt[0], int):
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    if isinstance(prompt[0], int):
        prompts = [list(prompt)]
    elif isinstance(prompt[0], str):
        prompts = [served.tokenizer.encode(p) for p in prompt]
    else:
        prompts = [list(p) for p in prompt]
    for ids in prompts:
        check_token_ids(ids, served.vocab_size, "prompt")
    return prompts


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    if any(not 0 <= t < vocab_size for t in ids):
        raise bad_request(f"{param}: token ids must lie in [0, {vocab_size})", param=param)


def chat_prompt(messages: list[ChatMessage], tokenizer, options: TemplateOptions,
                tools: ToolUse | None = None) -> list[int]:
    """The model's chat template over `messages` as token ids: ending with the assistant's turn opened
    (what LLM.encode does for chat messages, so the server and `forerun generate` agree), or, with
    `add_generation_prompt` off, after the last message's turn; or, with `continue_final_message`,
    inside the last message, which must be the assistant's partial answer: the text stops right after
    it, so the model continues it (vLLM's extras of these names)."""
    continue_final_message = options.continue_final_message
    if continue_final_message and messages[-1].role != "assistant":
        raise bad_request("continue_final_message needs the last message to be the assistant's",
                          param="continue_final_message")
    try:
        native = renders_tools(tokenizer)
        turns = [_turn(m, native) for m in messages]
        extra = {}
        if tools is not None and native:
            extra["tools"] = [t.as_openai() for t in tools.tools]
        elif tools is not None:
            turns = _with_tools_prompt(turns, tools.tools)
        if not continue_final_message:
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=options.add_generation_prompt, **extra)
        else:  # render the partial answer followed by a marker, and cut the text at the marker
            partial = turns[-1]["content"]
            turns[-1] = {**turns[-1], "content": partial + _CUT}
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=False, **extra)
            if text.count(_CUT) != 1:
                raise ValueError("the chat template does not show the final message as sent, so it cannot be "
                                 "continued")
            text = text[:text.index(_CUT)]
    except ValueError as e:
        raise bad_request(str(e), param="messages") from None
    except Exception as e:  # noqa: BLE001  (a template's own raise_exception or a render error)
        raise bad_request(f"the chat template cannot render these messages: {e}", param="messages") from None
    return tokenizer.encode(text, add_bos=False)


_CUT = "\u2063forerun-continue\u2063"  # where a continued final message ends (invisible separators around a name)


def renders_tools(tokenizer) -> bool:
    """Whether the model's chat template renders `tools` itself (then it asks for Hermes' calls, one
    per <tool_call> tag, as Qwen's and Hermes' do); otherwise forerun writes SmolLM2's tools prompt."""
    return "tools" in (tokenizer.chat_template or "")


def _turn(message: ChatMessage, native: bool) -> dict:
    """A message as chat templates read it. Calls in the history are shown as the model writes them:
    to a template that renders tools, as `tool_calls` with their arguments parsed (transformers'
    convention); to one that does not, as SmolLM2's <tool_call> list after the text."""
    turn = {"role": TEMPLATE_ROLE.get(message.role, message.role), "content": message.text()}
    calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)}
             for c in message.tool_calls or ()]
    if calls and native:
        turn["tool_calls"] = [{"id": c.id, "type": "function", "function": call}
                              for c, call in zip(message.tool_calls, calls)]
    elif calls:
        turn["content"] += OPEN + json.dumps(calls) + CLOSE
    if message.tool_call_id is not None and native:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def _arguments(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"a tool call's arguments must be a JSON object, got {text[:80]!r}")
    return value


def _with_tools_prompt(turns: list[dict], tools: tuple[Tool, ...]) -> list[dict]:
    """The tools prompt as the system message, before the one the client sent (if any)."""
    prompt = tools_prompt(list(tools))
    if turns[0]["role"] == "system":
        return [{**turns[0], "content": prompt + "\n\n" + turns[0]["content"]}, *turns[1:]]
    return [{"role": "system", "content": prompt}, *turns]


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A chat request's tools and how it may call them: "auto" (the model chooses whether to call; a
    call it starts is held to the tools' schemas by a grammar), "required" (a grammar makes it call
    some tool) or a tool's name (that tool)."""

    tools: tuple[Tool, ...]
    choice: str
    native: bool  # the template renders the tools (Hermes' calls), else SmolLM2's prompt and calls
    parallel: bool = True  # more than one call per reply

    @property
    def names(self) -> set[str]:
        return {t.name for t in self.tools}

    def grammar(self) -> StructuredOutput:
        """Under "auto" any text, but a tag the model opens holds valid calls of the tools; under
        "required" calls only; a named tool: one call of it."""
        if self.choice == "auto":
            return call_grammar(list(self.tools), one_per_tag=self.native, single=not self.parallel, optional=True)
        tools = list(self.tools) if self.choice == "required" else [t for t in self.tools if t.name == self.choice]
        return call_grammar(tools, one_per_tag=self.native, single=not self.parallel or self.choice != "required")


def tool_use(body: ChatCompletionRequest, tokenizer) -> ToolUse | None:
    """The request's tools, checked, unless there are none or tool_choice is "none" (then the model
    is not shown them, as vLLM does by default, and its text is not parsed)."""
    if not body.tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice asks for a tool call, but no tools are given", param="tool_choice")
        return None
    if body.tool_choice == "none":
        return None
    tools = []
    for i, t in enumerate(body.tools):
        where = f"tools.{i}.function.parameters"
        try:
            tools.append(Tool(t.function.name, t.function.description or "", t.function.parameters))
            check_constraint(StructuredOutput(json=t.function.parameters))
        except ValueError as e:
            raise bad_request(f"{where}: {e}", param=where) from None
    if len({t.name for t in tools}) < len(tools):
        raise bad_request("tools: two tools have the same name", param="tools")
    choice = body.tool_choice or "auto"
    if isinstance(choice, NamedToolChoice):
        choice = choice.function.name
        if choice not in {t.name for t in tools}:
            raise bad_request(f"tool_choice names {choice!r}, which is not in tools", param="tool_choice")
    return ToolUse(tuple(tools), choice, renders_tools(tokenizer), body.parallel_tool_calls)


def structured_output(body: SamplingFields, tools: ToolUse | None = None) -> StructuredOutput | None:
    """The one constraint a request asks for: OpenAI's response_format (chat), vLLM's guided_json,
    guided_regex, guided_choice, guided_grammar or structured_outputs, or the tools' grammar (under
    tool_choice "auto" only where no other is asked: then calls are parsed from the text, unchecked).
    It is compiled here, so a bad one is a 400 naming its field."""
    asked = []  # (field, StructuredOutput's arguments)
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type == "json_schema":
        asked.append(("response_format.json_schema.schema", {"json": response_format.json_schema.schema_}))
    elif response_format is not None and response_format.type == "json_object":
        asked.append(("response_format", {"json_object": True}))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        if getattr(body, name) is not None:
            asked.append((name, {key: getattr(body, name)}))
    if body.structured_outputs is not None:
        fields = body.structured_outputs.model_dump(exclude_none=True)
        asked.append(("structured_outputs", {("json" if k == "json_" else k): v for k, v in fields.items()}))
    if tools is not None and (tools.choice != "auto" or not asked):  # under "auto", another constraint wins
        asked.append(("tool_choice", {"grammar": tools.grammar().grammar}))
    if len(asked) > 1:
        raise bad_request(f"give one constraint, not {' and '.join(name for name, _ in asked)}", param=asked[1][0])
    if not asked:
        return None
    name, fields = asked[0]
    try:
        if isinstance(fields.get("json"), str):  # guided_json may be the schema's text
            fields["json"] = json.loads(fields["json"])
        spec = StructuredOutput(**fields)
        check_constraint(spec)
    except ValueError as e:
        raise bad_request(f"{name}: {e}", param=name) from None
    return spec


def max_new_tokens(asked: int | None, prompt_len: int, n: int, served: Served) -> int:
    """The token limit: as asked, else what the context leaves and the KV pool (forerun.engine.kv_pool,
    whose size is fixed) can hold for n samples at once. A prompt that leaves no room, or a limit past
    the context, is a 400 (as vLLM answers), not a silently shortened answer."""
    context, pool = served.context, served.pool
    if prompt_len >= context:
        raise bad_request(f"the prompt has {prompt_len} tokens; this model's context holds {context} "
                          "(prompt and completion together)", param="messages")
    room = context - prompt_len
    if asked is None:  # as the engine counts: the prompt's blocks, and per sample its own plus one
        blocks = (pool.num_blocks - pool.blocks_for(prompt_len)) // n - 1
        limit = max(min(room, blocks * pool.block_size), 1)
        recommended = served.defaults.max_new_tokens
        return limit if recommended is None else min(limit, recommended)
    if asked > room:
        raise bad_request(f"this model's context holds {context} tokens; the prompt has {prompt_len}, so at most "
                          f"{room} can be generated, but {asked} were asked for", param="max_tokens")
    return asked


def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None, served: Served,
                    structured: StructuredOutput | None = None) -> SamplingParams:
    stop_ids = list(body.stop_token_ids or ())
    check_token_ids(stop_ids, served.vocab_size, "stop_token_ids")
    defaults = served.defaults
    temperature = _given(body.temperature, defaults.temperature, 1.0)
    fields = dict(temperature=temperature if temperature >= GREEDY_BELOW else 0.0,
                  top_p=_given(body.top_p, defaults.top_p, 1.0),
                  top_k=max(_given(body.top_k, defaults.top_k, 0), 0), seed=body.seed, max_new_tokens=max_tokens,
                  stop=body.stop_strings(), ignore_eos=body.ignore_eos, n=body.n,
                  stop_token_ids=tuple(stop_ids), include_stop_str_in_output=body.include_stop_str_in_output,
                  logprobs=logprobs, structured=structured, **_processing(body, served))
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        raise bad_request(str(e), param=_field_of(str(e))) from None


def _processing(body: SamplingFields, served: Served) -> dict:
    """The SamplingParams fields of the penalties, logit bias, min-p, min_tokens, bad words and best_of,
    where the body sets them (None: the default)."""
    asked = dict(presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                 repetition_penalty=body.repetition_penalty, min_p=body.min_p, min_tokens=body.min_tokens,
                 bad_words=tuple(body.bad_words) if body.bad_words else None,
                 logit_bias=logit_bias(body.logit_bias, served.vocab_size) if body.logit_bias else None,
                 best_of=getattr(body, "best_of", None))  # completions only, as OpenAI has it
    return {name: value for name, value in asked.items() if value is not None}


def logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as JSON keys) with integer ids, each within the vocabulary."""
    try:
        ids = {int(key): value for key, value in bias.items()}
    except ValueError:
        raise bad_request("logit_bias: keys must be token ids", param="logit_bias") from None
    check_token_ids(list(ids), vocab_size, "logit_bias")
    return ids


def _field_of(message: str) -> str | None:
    """The SamplingParams field a validation message starts with (they all name theirs first)."""
    name = message.split(maxsplit=1)[0] if message else ""
    return name if name in SamplingParams.__dataclass_fields__ else None


def _given(asked, recommended, default):
    """The request's value, else the model's generation_config's, else OpenAI's default."""
    return asked if asked is not None else recommended if recommended is not None else default


def prompt_logprobs_top(body: SamplingFields) -> int | None:
    """How many top tokens the prompt's own log-probabilities need per position (an echo with
    logprobs, vLLM's prompt_logprobs, or both), or None when the request wants none."""
    wanted = [body.prompt_logprobs]
    if isinstance(body, CompletionRequest) and body.echo:
        wanted.append(body.logprobs)
    wanted = [k for k in wanted if k is not None]
    return max(wanted) if wanted else None


def chat_logprobs(body: ChatCompletionRequest) -> int | None:
    return (body.top_logprobs or 0) if body.logprobs else None


def request_spec(asked: Speculation | str | None, default: SpecConfig) -> SpecConfig:
    """The server's SpecConfig, overridden by the request's `speculation` (a method name, or an
    object of SpecConfig fields). Another method than the server's keeps only the server's draft model."""
    from forerun.drafters.registry import methods

    if asked is None:
        return default
    if isinstance(asked, str):
        asked = Speculation(method=asked)
    fields = asked.model_dump(exclude_none=True)
    method = fields.pop("method", default.method)
    if method not in methods():
        raise bad_request(f"unknown speculation method {method!r}; choose one of {', '.join(methods())}",
                          param="speculation.method")
    base = default if method == default.method else SpecConfig(method=method, draft_model=default.draft_model)
    if "num_draft" in fields:  # a length asked for is kept, as `--num-draft` keeps it
        fields.setdefault("adaptive", False)
        fields.setdefault("max_draft", max(fields["num_draft"], base.max_draft))
    try:
        return dataclasses.replace(base, **fields)
    except ValueError as e:
        raise bad_request(f"speculation: {e}", param="speculation") from None

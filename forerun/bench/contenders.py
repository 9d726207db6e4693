"""What the harness runs: a contender turns prompt token ids into generated token ids.

forerun's methods and the peers (peers.py) share this interface, so the runner treats them alike:
every contender gets the same prompt ids, and the runner times every call the same way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch

from forerun.config import SamplingParams, SpecConfig
from forerun.llm import LLM
from forerun.options import coerce, parse_options, split_option

Messages = list[dict]  # chat messages [{"role": ..., "content": ...}]


@dataclass(frozen=True, slots=True)
class Output:
    """One generation. Fields a contender cannot observe are None (e.g. draft time inside HF generate)."""

    token_ids: list[int]  # new tokens, EOS excluded
    target_forwards: int | None = None
    draft_s: float | None = None
    verify_s: float | None = None
    accept_histogram: dict[int, int] | None = None  # tokens gained per target forward -> forwards


@dataclass(frozen=True, slots=True)
class Label:
    """What a contender runs, printed next to its numbers."""

    engine: str  # "forerun", "transformers 5.2", "llama.cpp (llama-cpp-python 0.3.9)"
    method: str  # "ar", "pld", "prompt lookup", ...
    dtype: str  # weight dtype or quantization as stored in memory
    threads: int
    device: str
    weight_bytes: int  # weight bytes one AR step reads (an embedding table only when tied to the head)
    extra: dict = field(default_factory=dict)  # anything else that changes the numbers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Contender(Protocol):
    name: str
    label: Label

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Output: ...


class Codec(Protocol):
    """Shared by every contender, so all of them see identical prompt ids for identical conversations."""

    def encode(self, messages: Messages) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ChatCodec:
    """forerun's tokenizer with the model's chat template (plain concatenation without one)."""

    def __init__(self, llm: LLM):
        if llm.tokenizer is None:
            raise ValueError("the model has no tokenizer; give the runner a Codec for its token ids")
        self.llm = llm

    def encode(self, messages: Messages) -> list[int]:
        if self.llm.tokenizer.chat_template is not None:
            return self.llm.encode(messages)
        return self.llm.encode("\n\n".join(m["content"] for m in messages), chat=False)

    def decode(self, ids: list[int]) -> str:
        return self.llm.tokenizer.decode(ids)

    @property
    def eos_ids(self) -> frozenset[int]:
        return frozenset(self.llm.tokenizer.eos_token_ids)


class ForerunContender:
    def __init__(self, name: str, llm: LLM, spec: SpecConfig, label: Label):
        self.name, self.llm, self.spec, self.label = name, llm, spec, label

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Output:
        # Contenders share an engine per weights: a prompt another contender (or an earlier turn) left
        # in the prefix cache would be prefilled for free. Every generation starts cold, as each
        # peer's does.
        self.llm.engine.reset_prefix_cache()
        gen = self.llm.generate_ids(prompt_ids, params, self.spec)
        s = gen.stats
        return Output(token_ids=gen.token_ids, target_forwards=s.target_forwards, draft_s=s.draft_s,
                      verify_s=s.verify_s, accept_histogram=dict(s.accept_histogram))


@dataclass(frozen=True, slots=True)
class ContenderSpec:
    """`method[:dtype][:key=value...]`, e.g. `pld`, `ar:bfloat16`, `layer-skip:float32:exit_layer=8`,
    `retrieval:datastore=DS`. A key naming a SpecConfig field configures the method, one naming an
    engine argument (quant) goes to LLM(...), and any other is the method's own option
    (SpecConfig.options, which the drafter checks)."""

    text: str
    method: str
    dtype: str | None
    options: tuple[tuple[str, object], ...]

    @classmethod
    def parse(cls, text: str) -> "ContenderSpec":
        method, *rest = text.strip().split(":")
        if not method:
            raise ValueError(f"empty method in {text!r}")
        dtype = None
        options = []
        for part in rest:
            if "=" in part:
                key, value = split_option(part, f"{text!r}: an option")
                options.append((key, coerce(key, value, None)))
            elif dtype is None:
                dtype = part
            else:
                raise ValueError(f"{text!r}: more than one dtype; write options as key=value")
        return cls(text.strip(), method, dtype, tuple(options))


def parse_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def parse_key_values(pairs: list[str] | None, flag: str = "--engine-arg") -> dict[str, object]:
    """["quant=q4", "num_draft=6"] -> {"quant": "q4", "num_draft": 6}: each value's type read from its text."""
    return {key: coerce(key, value, None) for key, value in parse_options(pairs, flag).items()}


class EngineCache:
    """One LLM per (dtype, engine options), shared by every method that runs on it."""

    def __init__(self, model: str | None, device: str, engine_kwargs: dict | None = None):
        self.model, self.device, self.engine_kwargs = model, device, dict(engine_kwargs or {})
        self._engines: dict[tuple, LLM] = {}

    def get(self, dtype: str, engine_options: dict) -> LLM:
        kwargs = {**self.engine_kwargs, **engine_options}
        key = (dtype, tuple(sorted((k, _hashable(v)) for k, v in kwargs.items())))
        if key not in self._engines:
            self._engines[key] = LLM(self.model, dtype=dtype, device=self.device, **kwargs)
        return self._engines[key]


def _hashable(value: object) -> object:
    try:
        hash(value)
    except TypeError:
        return id(value)  # e.g. a prebuilt Runtime passed as runtime=...
    return value


ENGINE_OPTIONS = ("quant",)  # LLM(...) arguments a contender may set; dtype is its own field


def forerun_contenders(specs: list[str], engines: EngineCache, default_dtype: str = "float32",
                       spec_defaults: dict | None = None) -> list[ForerunContender]:
    """Build a contender per spec string (see ContenderSpec). `spec_defaults` sets SpecConfig fields
    for every method (e.g. draft_model), before each spec's own options."""
    from forerun.drafters.registry import methods

    known = methods()
    spec_fields = {f.name for f in dataclasses.fields(SpecConfig)}
    out = []
    for text in specs:
        spec = ContenderSpec.parse(text)
        if spec.method not in known:
            raise ValueError(f"unknown method {spec.method!r} in {text!r}; choose one of {', '.join(known)}")
        options = dict(spec.options)
        spec_options = {k: v for k, v in options.items() if k in spec_fields}
        engine_options = {k: v for k, v in options.items() if k in ENGINE_OPTIONS}
        method_options = {k: v for k, v in options.items() if k not in spec_fields and k not in ENGINE_OPTIONS}
        if method_options:
            spec_options["options"] = method_options
        config = SpecConfig(**{**(spec_defaults or {}), **spec_options, "method": spec.method})
        dtype = spec.dtype or default_dtype
        llm = engines.get(dtype, engine_options)
        out.append(ForerunContender(spec.text, llm, config, forerun_label(llm, config, dtype, engine_options)))
    return out


def forerun_label(llm: LLM, spec: SpecConfig, dtype: str, engine_options: dict) -> Label:
    model = llm.runtime.model
    changed = {f.name: getattr(spec, f.name) for f in dataclasses.fields(SpecConfig)
               if f.name != "method" and getattr(spec, f.name) != f.default}
    if model.quantization:
        dtype = f"{model.quantization}, {dtype} activations"
    return Label(engine="forerun", method=spec.method, dtype=dtype, threads=torch.get_num_threads(),
                 device=str(llm.runtime.device), weight_bytes=weight_bytes_per_token(model, model.embed),
                 extra={**engine_options, **changed})


def weight_bytes_per_token(module: torch.nn.Module, embedding: torch.Tensor | None) -> int:
    """Bytes of weights one AR step reads: every tensor the module holds (parameters and tensors kept as
    attributes, e.g. packed or quantized weights), each storage once. Opaque pre-packed (mkldnn) copies
    are skipped, since the plain tensor they copy is counted. An embedding table that no other tensor
    shares is left out: a step reads one of its rows, unless it doubles as the output head."""
    sizes: dict[int, int] = {}
    uses: dict[int, int] = {}
    for tensor in _held_tensors(module):
        ptr = tensor.untyped_storage().data_ptr()
        sizes[ptr] = max(sizes.get(ptr, 0), tensor.untyped_storage().nbytes())
        uses[ptr] = uses.get(ptr, 0) + 1
    total = sum(sizes.values())
    if embedding is not None and embedding.numel():
        ptr = embedding.untyped_storage().data_ptr()
        if uses.get(ptr, 0) == 1:
            total -= sizes[ptr]
    return total


def _held_tensors(module: torch.nn.Module):
    for sub in module.modules():
        candidates = list(sub._parameters.values())
        for value in vars(sub).values():
            if isinstance(value, torch.Tensor):
                candidates.append(value)
            elif isinstance(value, (tuple, list)):
                candidates.extend(v for v in value if isinstance(v, torch.Tensor))
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. quantized weights
                fields = (getattr(value, f.name) for f in dataclasses.fields(value))
                candidates.extend(v for v in fields if isinstance(v, torch.Tensor))
        for t in candidates:
            if t is not None and t.numel() and not t.is_mkldnn:
                yield t

"""User-facing configuration: frozen dataclasses validated on construction."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from forerun.options import coerce

MAX_LOGPROBS = 20  # most likely alternatives a generated token can carry
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on what a sample may say (vLLM's StructuredOutputsParams): exactly one of a JSON
    schema, any JSON object, a regular expression, a choice of strings, or a grammar (Lark, or GBNF as
    llama.cpp writes it). forerun.structured compiles it; every token outside it is masked before
    verification, so speculative outputs equal plain ones under the same constraint."""

    json: str | None = None  # a JSON schema; a dict is accepted and kept as canonical JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # the whole output is one of these strings
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.json is not None and not isinstance(self.json, str):
            object.__setattr__(self, "json", json.dumps(self.json))  # hashable; key order kept (it orders the output)
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured output takes exactly one of json, json_object, regex, choice or grammar; "
                             f"got {', '.join(given) or 'none'}")
        if self.json is not None and not isinstance(json.loads(self.json), dict):
            raise ValueError("a JSON schema is an object")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("choice needs at least one non-empty string")
        if self.regex == "" or self.grammar == "":
            raise ValueError("an empty regex or grammar constrains nothing")

    @property
    def kind(self) -> str:
        return next(name for name in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, name))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    # Sample i > 0 of a seeded request draws from a seed derived from (seed, i); sample 0 from the
    # seed itself, so n = 1 and the first of n samples agree.
    seed: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # samples of the prompt: one prefill, then n sequences sharing its KV (forked)
    stop_token_ids: tuple[int, ...] = ()  # end a sample like EOS does (finish "stop"), even with ignore_eos
    include_stop_str_in_output: bool = False  # keep the stop string that ended a sample in its text
    # None: off. k >= 0: every generated token carries its log-probability under the model's own
    # distribution (log-softmax of the logits, before temperature, top-k and top-p), and the k most
    # likely tokens with theirs.
    logprobs: int | None = None
    # Processing that depends on the tokens before each position (forerun.logits_process), applied to the
    # target's logits before temperature; exact under speculation, since each draft node is processed from
    # its own path. Penalties as OpenAI and vLLM define them: presence and frequency over generated tokens,
    # repetition over the prompt and generated tokens (1 = off).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit); a dict is accepted
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (after temperature)
    min_tokens: int = 0  # EOS and stop_token_ids are masked, and stop strings not matched, before this many
    bad_words: tuple[str, ...] = ()  # words never completed: their last token is masked after the rest
    structured: StructuredOutput | None = None  # only what the constraint allows; ends when it is complete
    best_of: int | None = None  # sample best_of and return the n of highest cumulative logprob (None: n)
    max_tokens: int | None = None  # OpenAI's name for max_new_tokens: moved into it, then None

    def __post_init__(self) -> None:
        self._take_max_tokens()
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in self.logit_bias.items())))
        else:
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias))
        object.__setattr__(self, "bad_words", (self.bad_words,) if isinstance(self.bad_words, str)
                           else tuple(self.bad_words))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        self._check_processing()

    def _take_max_tokens(self) -> None:
        if self.max_tokens is None:
            return
        if self.max_new_tokens not in (DEFAULT_MAX_NEW_TOKENS, self.max_tokens):
            raise ValueError(f"max_tokens ({self.max_tokens}) and max_new_tokens ({self.max_new_tokens}) differ; "
                             "give one of them")
        object.__setattr__(self, "max_new_tokens", self.max_tokens)
        object.__setattr__(self, "max_tokens", None)

    def _check_processing(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not -100 <= b <= 100 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if any(t < 0 for t, _ in self.logit_bias) or len({t for t, _ in self.logit_bias}) < len(self.logit_bias):
            raise ValueError("logit_bias token ids must be distinct and >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be in [0, max_new_tokens = {self.max_new_tokens}], got {self.min_tokens}")
        if any(not w.strip() for w in self.bad_words):
            raise ValueError("bad_words must be non-empty words")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise ValueError(f"best_of must be >= n = {self.n}, got {self.best_of}")
            if self.greedy and self.best_of > self.n:
                raise ValueError("best_of > n needs temperature > 0: greedy samples are all the same")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def samples(self) -> int:
        """Sequences the request decodes: best_of of them, of which the n best are returned."""
        return self.best_of or self.n


@dataclass(frozen=True, slots=True)
class SpecConfig:
    method: str = "ar"  # a registered drafter (forerun.drafters.registry.methods())
    num_draft: int = 4  # draft tokens per step (tree depth); the start value when adaptive
    adaptive: bool = True  # grow after full acceptance, shrink after a rejection
    max_draft: int = 12  # ceiling for the adaptive length
    # Take plain one-token steps while speculative steps measure slower per token than plain ones
    # (engine.draft_length.SpeedGuard, kept per SpecConfig across requests); outputs are unchanged, only which
    # steps speculate.
    guard: bool = False
    # "fixed": verify the drafter's tree as proposed. "goodput": each step, keep of every sequence's
    # draft the nodes that maximise the batch's expected tokens per second, from the measured cost of
    # a forward by its rows and each tree position's acceptance (forerun.engine.goodput); greedy, or
    # drafts chosen deterministically (sampled trees keep their shape, their depth set before drawing).
    budget: str = "fixed"
    draft_model: str | None = None  # method "draft": HF directory or .gguf
    tree_width: int = 1  # method "draft": children per expanded node; 1 drafts a chain
    exit_layer: int | None = None  # method "layer-skip": layers the drafter runs (default: half)
    ngram_max: int = 3  # method "pld": longest suffix n-gram to match
    ngram_min: int = 1
    # Under a grammar, hang the tokens it forces (a key with its quotes and colon, closing braces) below
    # each deterministic draft's deepest node, or below the root where nothing was drafted: drafts the
    # target verifies like any other, that the masked target almost always accepts.
    forced_tokens: bool = True
    # Strategy-specific knobs as (name, value) pairs; a dict is accepted and frozen. Each drafter
    # reads its own into a typed record and rejects names it does not know.
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.options, dict):
            object.__setattr__(self, "options", tuple(sorted(self.options.items())))
        if self.num_draft < 1 or self.max_draft < 1:
            raise ValueError("num_draft and max_draft must be >= 1")
        if self.num_draft > self.max_draft:
            raise ValueError(f"num_draft ({self.num_draft}) exceeds max_draft ({self.max_draft})")
        if self.budget not in ("fixed", "goodput"):
            raise ValueError(f"budget must be 'fixed' or 'goodput', got {self.budget!r}")
        if self.tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {self.tree_width}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("need 1 <= ngram_min <= ngram_max")
        if self.exit_layer is not None and self.exit_layer < 1:
            raise ValueError(f"exit_layer must be >= 1, got {self.exit_layer}")

    @property
    def goodput(self) -> bool:
        return self.budget == "goodput"

    def option_values(self, known: dict[str, object]) -> dict[str, object]:
        """The drafter's options: `known` (name -> default) updated from self.options, which may
        only name known keys; text takes the default's type (forerun.options.coerce: so CLI strings are
        converted), and stays text where the default is None."""
        out = dict(known)
        for name, value in self.options:
            if name not in known:
                raise ValueError(f"method {self.method!r} has no option {name!r}; known: {', '.join(known)}")
            default = known[name]
            out[name] = coerce(name, value, str if default is None else type(default))
        return out


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The batched engine's limits (forerun.engine)."""

    kv_cache_tokens: int | None = None  # KV pool size in tokens; None: a share of free memory
    block_size: int = 16  # KV slots per pool block (the unit of sharing and of the prefix cache)
    max_num_seqs: int = 64  # sequences decoding at once
    max_step_tokens: int = 256  # pending prompt tokens one step may compute beside its decoding rows
    max_draft_rows: int = 256  # rows (tree plus extra) one sequence's verification may hold
    prefix_caching: bool = True  # reuse the KV of token blocks an earlier sequence computed
    # Tokens a sequence may hold, prompt and output together; None: the model's whole context. Lower,
    # it also lowers the pool's floor of one full context (a 128k-context model would otherwise
    # reserve 128k tokens of KV).
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (a prompt token and a generated one), got {self.max_model_len}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens must hold at least one block of {self.block_size}, "
                             f"got {self.kv_cache_tokens}")
        for name in ("block_size", "max_num_seqs", "max_step_tokens", "max_draft_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


GENERATION_FIELDS = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int}


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """The sampling a model's generation_config.json recommends, used by requests that leave a field
    unset (vLLM's --generation-config auto reads the same four). None: forerun's own default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        SamplingParams(**self.given())  # the same bounds as a request's

    @classmethod
    def from_generation_config(cls, config: dict) -> "GenerationDefaults":
        try:
            return cls(**{name: kind(config[name]) for name, kind in GENERATION_FIELDS.items()
                          if config.get(name) is not None})
        except (TypeError, ValueError) as e:
            raise ValueError(f"the model's generation_config.json: {e}") from None

    @classmethod
    def chosen(cls, choice: str, model: "GenerationDefaults") -> "GenerationDefaults":
        """vLLM's --generation-config: "auto" the model's own defaults, "none" (or vLLM's "vllm") none,
        anything else a folder whose generation_config.json gives them."""
        if choice == "auto":
            return model
        if choice in ("none", "vllm"):
            return cls()
        path = Path(choice) / "generation_config.json"
        if not path.is_file():
            raise ValueError(f"generation config: {choice!r} is not auto, none, vllm or a folder holding "
                             "generation_config.json")
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a JSON file ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path}: not a JSON object")
        return cls.from_generation_config(config)

    def given(self) -> dict[str, float | int]:
        """The fields the model's file sets."""
        return {name: getattr(self, name) for name in GENERATION_FIELDS if getattr(self, name) is not None}

"""Text <-> token ids for a Hugging Face model directory, on the Rust `tokenizers` library.

transformers is deliberately not imported here: it costs seconds at start-up and the engine only needs
encode, decode, the special token ids and the chat template.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

# End-of-turn markers of common chat formats. A template that writes one ends every assistant turn
# with it, so generation must stop there even when the config's eos_token names another token.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the settings from tokenizer_config.json that encode/decode need."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict[str, Any], extra_eos_ids: Iterable[int] = ()):
        self._backend = backend
        self._config = config
        self.chat_template: str | None = _template_text(config.get("chat_template"))
        self.bos_token_id: int | None = self._token_id(_token_text(config.get("bos_token")))
        self._extra_eos_ids = tuple(extra_eos_ids)
        self.eos_token_ids: frozenset[int] = frozenset(self._eos_ids(self._extra_eos_ids))
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._add_bos = self._adds_bos_by_default()

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}; forerun needs a fast (Rust) tokenizer file")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        # Chat templates may also live in their own file (newer transformers saves them there).
        template_file = path / "chat_template.jinja"
        if not config.get("chat_template") and template_file.is_file():
            config["chat_template"] = template_file.read_text()
        extra = [*_eos_list(_read_json(path / "generation_config.json")), *_eos_list(_read_json(path / "config.json"))]
        return cls(backend, config, extra)

    # -- encode / decode -------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS is prepended when `add_bos` (default: as the model's config says).

        The backend's post-processor is bypassed so that no other special tokens (EOS, SEP) sneak in.
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        add_bos = self._add_bos if add_bos is None else add_bos
        if add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def to_json(self) -> str:
        """The backend tokenizer as tokenizer.json text (what grammar libraries read the vocabulary from)."""
        return self._backend.to_str()

    def same_vocab(self, other: "Tokenizer") -> bool:
        """True when both map every token string to the same id (a draft model must share the vocabulary)."""
        return self._backend.get_vocab(with_added_tokens=True) == other._backend.get_vocab(with_added_tokens=True)

    def fingerprint(self) -> str:
        """A short hash of the token -> id map: equal fingerprints mean interchangeable token ids."""
        vocab = sorted(self._backend.get_vocab(with_added_tokens=True).items())
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]

    # -- chat ------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages`, rendered like transformers' `apply_chat_template(tokenize=False)`."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template; pass raw text instead of messages")
        return _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=_token_text(self._config.get("bos_token")) or "",
            eos_token=_token_text(self._config.get("eos_token")) or "",
            **kwargs,
        )

    def use_chat_template(self, template: str) -> None:
        """Render chats with `template` instead of the model's (before an engine reads the EOS ids:
        the end-of-turn token the template writes stops generation)."""
        try:  # a syntax error shows now, not at the first request
            _compile_template(template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not parse: {e}") from None
        self.chat_template = self._config["chat_template"] = template
        self.eos_token_ids = frozenset(self._eos_ids(self._extra_eos_ids))

    # -- persistence -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, loadable by `from_dir` and by transformers."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self._config}
        config["add_bos_token"] = self._add_bos
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    # -- helpers ---------------------------------------------------------------------------------

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _eos_ids(self, extra_eos_ids: Iterable[int]) -> set[int]:
        ids = set(extra_eos_ids)
        eos = self._token_id(_token_text(self._config.get("eos_token")))
        if eos is not None:
            ids.add(eos)
        for token in _END_OF_TURN_TOKENS:
            token_id = self._token_id(token)
            if token_id is not None and self.chat_template and token in self.chat_template:
                ids.add(token_id)
        return ids

    def _adds_bos_by_default(self) -> bool:
        """The config flag when present, else whether tokenizer.json's post-processor prepends BOS
        (Llama 3 says so only there)."""
        flag = self._config.get("add_bos_token")
        if flag is not None:
            return bool(flag)
        return self.bos_token_id is not None and self._backend.encode("").ids[:1] == [self.bos_token_id]


def chat_template_text(file_or_template: str) -> str:
    """A chat template given as a file's path or as the Jinja text itself (vLLM's --chat-template)."""
    path = Path(file_or_template).expanduser()
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # a template too long to be a file name
        pass
    if "{{" in file_or_template or "{%" in file_or_template:
        return file_or_template
    raise ValueError(f"chat template {file_or_template!r} is neither a file nor a Jinja template")


def _compile_template(source: str) -> jinja2.Template:
    # Same environment as transformers' chat templates, so templates written for it render alike.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # jinja's built-in tojson HTML-escapes its output, which would corrupt prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token: str | dict | None) -> str | None:
    """Special tokens are written either as a string or as an AddedToken dict with "content"."""
    return token.get("content") if isinstance(token, dict) else token


def _template_text(template: str | list | None) -> str | None:
    """Some configs hold a list of named templates; the engine uses the "default" one."""
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template


def _eos_list(cfg: dict[str, Any]) -> list[int]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [eos]

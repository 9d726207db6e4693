"""vLLM's `--speculative-config` JSON read onto forerun's SpecConfig fields, so that a vLLM command line
keeps working: its method names map onto forerun's drafters and its keys onto their settings.

A length given as num_speculative_tokens is fixed, as vLLM runs it (forerun's own default adapts the
length). Keys forerun has no counterpart for are refused, not ignored: a setting that silently did
nothing would make a comparison with vLLM wrong without saying so.
"""
from __future__ import annotations

import json

from forerun.config import SpecConfig

# vLLM's method -> forerun's drafter
VLLM_METHODS = {"ngram": "pld", "eagle": "eagle", "eagle3": "eagle", "medusa": "medusa", "draft_model": "draft"}

# Where `model` goes for each drafter that takes one
_MODEL_FIELD = {"draft": "draft_model", "eagle": "head", "medusa": "head"}


def parse_speculative_config(text: str, registered: list[str]) -> dict:
    """SpecConfig keyword arguments (options as a dict) from the JSON text; `registered` names forerun's
    drafters, whose own names are taken as well as vLLM's."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--speculative-config is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError("--speculative-config must be a JSON object, e.g. "
                         '\'{"method": "ngram", "num_speculative_tokens": 4}\'')
    config = dict(config)
    method = _method(config.pop("method", None), config.get("model"), registered)
    fields: dict = {"method": method, "options": {}}
    if "num_speculative_tokens" in config:
        fields.update(_fixed_length(config.pop("num_speculative_tokens")))
    if "model" in config:
        _place_model(fields, method, config.pop("model"))
    if method == "pld":
        for vllm_key, field in (("prompt_lookup_max", "ngram_max"), ("prompt_lookup_min", "ngram_min")):
            if vllm_key in config:
                fields[field] = _positive(vllm_key, config.pop(vllm_key))
    if config:
        raise ValueError(f"--speculative-config: forerun has no counterpart for {', '.join(sorted(config))}; "
                         "it reads method, num_speculative_tokens, model, and for ngram prompt_lookup_max/min")
    return fields


def _method(name: object, model: object, registered: list[str]) -> str:
    if name is None:  # vLLM's rule: a model without a method is a draft model
        if model is None:
            raise ValueError("--speculative-config needs a method (or a draft model)")
        return "draft"
    if name in VLLM_METHODS:
        return VLLM_METHODS[name]
    if name in registered:
        return name
    raise ValueError(f"--speculative-config: unknown method {name!r}; vLLM's names: {', '.join(VLLM_METHODS)}; "
                     f"forerun's: {', '.join(registered)}")


def _fixed_length(value: object) -> dict:
    num = _positive("num_speculative_tokens", value)
    return {"num_draft": num, "adaptive": False, "max_draft": max(num, SpecConfig().max_draft)}


def _place_model(fields: dict, method: str, model: object) -> None:
    if method not in _MODEL_FIELD:
        raise ValueError(f"--speculative-config: method {method} takes no model")
    if not isinstance(model, str) or not model:
        raise ValueError("--speculative-config: model must be a path or Hub id")
    field = _MODEL_FIELD[method]
    if field == "head":
        fields["options"]["head"] = model
    else:
        fields[field] = model


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"--speculative-config: {name} must be a positive integer, got {value!r}")
    return value

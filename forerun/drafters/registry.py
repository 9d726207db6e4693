"""Drafters are found by name. Each strategy file registers its class with @register; the registry
knows the built-in ones by the module that holds them and imports that module the first time its
method is built, so it imports no drafter itself (the drafters import it) and building `pld` loads
no draft model or head code."""
from __future__ import annotations

import importlib

from forerun.config import SpecConfig
from forerun.drafters.base import Drafter

_DRAFTERS: dict[str, type[Drafter]] = {}

BUILTIN_MODULES = {  # method -> the module under forerun.drafters that registers it
    "ar": "ar", "auto": "auto", "del": "del_exit", "draft": "draft_model", "eagle": "eagle", "layer-skip": "layer_skip",
    "lookahead": "lookahead", "medusa": "medusa", "pld": "pld", "rasd": "rasd", "recycle": "recycle",
    "retrieval": "retrieval", "stand": "stand",
}


def register(name: str):
    def wrap(cls: type[Drafter]) -> type[Drafter]:
        if name in _DRAFTERS:
            raise ValueError(f"drafter {name!r} registered twice")
        _DRAFTERS[name] = cls
        return cls
    return wrap


def methods() -> list[str]:
    return sorted({*BUILTIN_MODULES, *_DRAFTERS})


def drafter_class(method: str) -> type[Drafter]:
    if method not in _DRAFTERS and method in BUILTIN_MODULES:
        module = f"forerun.drafters.{BUILTIN_MODULES[method]}"
        importlib.import_module(module)
        if method not in _DRAFTERS:
            raise LookupError(f"{module} did not register method {method!r}")
    if method not in _DRAFTERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(methods())}")
    return _DRAFTERS[method]


def build_drafter(target, spec: SpecConfig) -> Drafter:
    return drafter_class(spec.method)(target, spec)

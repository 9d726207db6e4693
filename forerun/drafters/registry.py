"""Drafters are found by name. Each strategy file registers its class with @register."""
from __future__ import annotations

from forerun.config import SpecConfig
from forerun.drafters.base import Drafter

_DRAFTERS: dict[str, type[Drafter]] = {}


def register(name: str):
    def wrap(cls: type[Drafter]) -> type[Drafter]:
        if name in _DRAFTERS:
            raise ValueError(f"drafter {name!r} registered twice")
        _DRAFTERS[name] = cls
        return cls
    return wrap


def methods() -> list[str]:
    _load_builtins()
    return sorted(_DRAFTERS)


def build_drafter(target, spec: SpecConfig) -> Drafter:
    _load_builtins()
    if spec.method not in _DRAFTERS:
        raise ValueError(f"unknown method {spec.method!r}; choose one of {', '.join(sorted(_DRAFTERS))}")
    return _DRAFTERS[spec.method](target, spec)


def _load_builtins() -> None:
    from forerun.drafters import ar, draft_model, layer_skip, pld, recycle, stand  # noqa: F401  (registers them)
    from forerun.drafters import del_exit, eagle, lookahead, rasd, retrieval  # noqa: F401

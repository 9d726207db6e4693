"""Strategies by name. Each takes its own options as dataclass fields; unknown options are rejected."""
from __future__ import annotations

import dataclasses
import types
import typing

from forerun.options import coerce
from forerun.scaling.strategies.adaptive import Adaptive
from forerun.scaling.strategies.astar import AStar
from forerun.scaling.strategies.base import Solver, Strategy
from forerun.scaling.strategies.beam import Beam
from forerun.scaling.strategies.best_of_n import BestOfN, WeightedBestOfN
from forerun.scaling.strategies.particles import Particles
from forerun.scaling.strategies.sample import Sample
from forerun.scaling.strategies.vote import Vote

STRATEGIES = {cls.name: cls for cls in (Sample, Vote, BestOfN, WeightedBestOfN, Beam, Particles, AStar, Adaptive)}


def build_strategy(name: str, **options) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    known = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    unknown = set(options) - set(known)
    if unknown:
        raise ValueError(f"strategy {name!r} has no option {sorted(unknown)[0]!r}; known: {', '.join(known) or 'none'}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(f"{name}.{k}", v, _plain(hints[k])) for k, v in options.items()})


def _plain(hint) -> type:
    """`float | None` -> float: an optional option's text is read as its type."""
    if isinstance(hint, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


__all__ = ["STRATEGIES", "Solver", "Strategy", "build_strategy"]

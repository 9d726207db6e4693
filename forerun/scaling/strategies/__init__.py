"""Strategies by name. Each takes its own options as dataclass fields; unknown options are rejected."""
from __future__ import annotations

import dataclasses

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
    return cls(**{k: _coerce(v, known[k].default) for k, v in options.items()})


def _coerce(value, default):
    if not isinstance(value, str) or default is None or isinstance(default, str):
        return float(value) if isinstance(value, str) and default is None else value
    return type(default)(value)


__all__ = ["STRATEGIES", "Solver", "Strategy", "build_strategy"]

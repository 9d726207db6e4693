"""What a `forerun scale` command line asks for, built from its parsed arguments: the budgets, the
strategies with their options, the model and a solver per strategy. The command (scaling/cli.py)
and its Ray workers (scaling/distributed.py) both build their runs here."""
from __future__ import annotations

import argparse

from forerun.cli_args import engine_config, model_options, spec_config
from forerun.options import split_option
from forerun.scaling.scorers import SCORERS
from forerun.scaling.strategies import build_strategy


def parse_budgets(text: str) -> list[int]:
    """--n "1,4,8" -> [1, 4, 8]."""
    try:
        budgets = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--n takes integers separated by commas, got {text!r}") from None
    if not budgets or min(budgets) < 1:
        raise ValueError(f"--n budgets must be >= 1, got {text!r}")
    return budgets


def strategies_from_args(a: argparse.Namespace) -> list:
    names = [s.strip() for s in a.strategy.split(",") if s.strip()]
    options: dict[str, dict[str, str]] = {name: {} for name in names}
    for pair in a.strategy_opt:
        key, value = split_option(pair, "--strategy-opt", "STRATEGY.NAME=VALUE")
        strategy, dot, name = key.partition(".")
        if not dot:
            raise ValueError(f"--strategy-opt takes STRATEGY.NAME=VALUE, got {pair!r}")
        if strategy not in options:
            raise ValueError(f"--strategy-opt {pair!r} names a strategy not in --strategy")
        options[strategy][name] = value
    built = [build_strategy(name, **options[name]) for name in names]
    needing = [s.name for s in built if s.needs_scorer or getattr(s, "prune", None) is not None]
    if needing and not a.reward:
        raise ValueError(f"{', '.join(needing)} need a scorer: give --reward ({', '.join(SCORERS)})")
    return built


def load_llm(a: argparse.Namespace):
    from forerun.llm import LLM

    return LLM(a.model, **model_options(a), engine=engine_config(a))


def solver_factory(llm, task, a: argparse.Namespace):
    """strategy -> Solver, each with its own generator (so its own account) and scorer, all on one
    engine and sharing the kept samples; answer() asks for one per thread."""
    from forerun.scaling.generator import EngineGenerator
    from forerun.scaling.model import ModelScore
    from forerun.scaling.scorers import RewardModel, build_scorer
    from forerun.scaling.strategies import Solver

    needs_logprobs = a.reward in ("mean-logprob", "sum-logprob")
    base = EngineGenerator(llm, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                           seed=a.seed, spec=spec_config(a), logprobs=needs_logprobs)
    # a reward model is loaded once (it keeps no account); the model's own scorers count in each account
    reward: RewardModel | None = build_scorer("reward", None, a.reward_model) if a.reward == "reward" else None
    scores: dict = {}  # kept model scores, shared by every thread's scorer

    def make(strategy) -> Solver:
        generator = base.clone()
        scorer = reward
        if a.reward and reward is None:
            scorer = build_scorer(a.reward, ModelScore(llm, generator.account, base.driver.lock, scores))
        return Solver(generator, task.answer_of, scorer, a.delimiter, a.max_steps, a.seed)

    return make

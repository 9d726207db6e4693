"""its_hub (PyPI `its-hub`) against forerun's native strategies, at the same budgets, model, sampling
and scorer.

  its_hub   SelfConsistency, BestOfN and ParticleFiltering: its own algorithms and prompt handling,
            generating through `forerun serve` (started here on a free loopback port)
  forerun   vote, best-of-n and particles from forerun.scaling, on an engine in this process

Both sides run the same model and quantization, temperature, token limit (per step for the particle
filters), step delimiter and step count, and both score with forerun's P(True)
(forerun.scaling.scorers.PTrue) on one in-process copy of the model, inside the timed region: its_hub
reaches it through an outcome reward model (best-of-n) and a process reward model (particle filtering).
The task's checker grades both sides' chosen responses. The contenders alternate per question (its_hub
first on even questions, forerun first on odd ones), so drift of a shared machine falls on both.

    python benchmarks/its_hub_peer.py --limit 30 --budgets 4,8 --out its-hub-out
    python benchmarks/its_hub_peer.py --task gsm8k --data ../shared/data/gsm8k/test.jsonl --limit 30

Needs `pip install 'its-hub[lm]'` (numpy, aiohttp, backoff; no torch).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import its_hub
import numpy as np
from its_hub.api import AbstractOutcomeRewardModel, AbstractProcessRewardModel
from its_hub.core.algorithms.bon import BestOfN
from its_hub.core.algorithms.particle_gibbs import ParticleFiltering
from its_hub.core.algorithms.self_consistency import SelfConsistency
from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel
from its_hub.core.lms.step_generation import StepGeneration
from its_hub.core.utils import extract_content_from_lm_response

from forerun import LLM
from forerun.bench.serving import free_port, stop_process, wait_healthy
from forerun.config import SpecConfig
from forerun.scaling.generator import EngineGenerator
from forerun.scaling.model import ModelScore
from forerun.scaling.run import solve
from forerun.scaling.scorers import PTrue
from forerun.scaling.strategies import Solver, build_strategy
from forerun.scaling.tasks import build_task
from forerun.scaling.types import Account

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "SmolLM2-135M-Instruct"
DELIMITER = "\n\n"  # between solution steps, on both sides
FINAL_MARK = "####"  # the tasks ask for '#### <number>': its_hub's particles stop on a step holding it
METHODS = (("self-consistency", "vote"), ("best-of-n", "best-of-n"), ("particle-filtering", "particles"))

NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30)

warnings.filterwarnings("ignore", category=DeprecationWarning, module="its_hub")  # agenerate(), per step


# -- its_hub's side: reward models on forerun's P(True), and the client -----------------------------

class PTrueOutcome(AbstractOutcomeRewardModel):
    """its_hub's outcome reward: forerun's log P(True) of a conversation's last (assistant) message as
    the answer to its user message."""

    def __init__(self, ptrue: PTrue):
        self.ptrue = ptrue

    def score(self, conversations, **kwargs) -> list[float]:
        return [self.ptrue.log_p_true(_user_text(c), c[-1].extract_text_content()) for c in conversations]

    async def ascore(self, conversations, orchestrator=None, **kwargs) -> list[float]:
        return self.score(conversations)


class PTrueProcess(AbstractProcessRewardModel):
    """its_hub's process reward: forerun's P(True) of each partial solution, as a probability (its
    particle filter takes logit(reward) as a particle's log-weight)."""

    def __init__(self, ptrue: PTrue):
        self.ptrue = ptrue

    def score(self, prompt: str, steps: list[str]) -> list[float]:
        return [min(1.0, math.exp(self.ptrue.log_p_true(prompt, s))) for s in steps]

    async def ascore(self, prompt: str, steps: list[str]) -> list[float]:
        return self.score(prompt, steps)


def _user_text(conversation) -> str:
    return next(m.extract_text_content() for m in conversation if m.role == "user")


class ServedLM(OpenAICompatibleLanguageModel):
    """its_hub's client with one change, in how requests travel, not in what they ask: no time limit
    per request. aiohttp's default (5 minutes) would end a slow generation, and its_hub retries a
    timeout: on a loaded machine it would pay for the same samples twice. Every request is its_hub's
    own body to /v1/chat/completions; a particle's next step ends with the assistant's partial answer
    and `continue_final_message: true`, which forerun serve continues as vLLM does."""

    def _get_session(self, loop) -> aiohttp.ClientSession:  # self-consistency and best-of-n requests
        with self._session_lock:
            session = self._sessions.get(loop)
            if session is None or session.closed:
                session = self._sessions[loop] = aiohttp.ClientSession(timeout=NO_TIMEOUT)
            return session

    async def _agenerate(self, messages_lst, stop=None, max_completion_tokens=None, temperature=None,
                         include_stop_str_in_output=None, *rest, **kwargs) -> list[dict]:  # particle steps
        temperatures = temperature if isinstance(temperature, list) else [temperature] * len(messages_lst)
        async with aiohttp.ClientSession(timeout=NO_TIMEOUT) as http:
            return await asyncio.gather(*(self._one(http, m, stop, max_completion_tokens, t, include_stop_str_in_output)
                                          for m, t in zip(messages_lst, temperatures)))

    async def _one(self, http, messages, stop, max_tokens, temperature, include_stop) -> dict:
        body = self._prepare_request_data([_turn(m) for m in messages], stop, max_tokens, temperature, include_stop)
        async with http.post(self._chat_completion_endpoint, headers=self.headers, json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"{self._chat_completion_endpoint} answered {r.status}: {await r.text()}")
            return dict((await r.json())["choices"][0]["message"])


def _turn(message) -> dict:
    return message if isinstance(message, dict) else {"role": message.role, "content": message.extract_text_content()}


# -- the two contenders ---------------------------------------------------------------------------------

@dataclass
class Answer:
    text: str
    wall_s: float
    generated_tokens: int | None
    score_forwards: int


class ItsHub:
    """its_hub's algorithms on `forerun serve`; P(True) on the in-process model."""

    def __init__(self, base_url: str, llm: LLM, answer_of, a: argparse.Namespace):
        self.base_url, self.seed, self.account = base_url, a.seed, Account()
        self.lm = ServedLM(endpoint=base_url + "/v1", api_key="none", model_name=MODEL_NAME,
                           max_completion_tokens=a.max_tokens, temperature=a.temperature)
        ptrue = PTrue(ModelScore(llm, self.account))
        steps = StepGeneration(max_steps=a.max_steps, step_token=DELIMITER, stop_token=FINAL_MARK,
                               temperature=a.temperature)
        self.algorithms = {"self-consistency": SelfConsistency(answer_of),
                           "best-of-n": BestOfN(PTrueOutcome(ptrue)),
                           "particle-filtering": ParticleFiltering(steps, PTrueProcess(ptrue))}

    def answer(self, method: str, question: str, key: str, budget: int) -> Answer:
        random.seed(f"{self.seed}:{key}:{budget}")  # its_hub's tie-breaks and resampling
        np.random.seed(random.getrandbits(32))
        tokens, forwards, start = self.generated_tokens(), self.account.score_forwards, time.perf_counter()
        response = self.algorithms[method].infer(self.lm, question, budget)
        wall = time.perf_counter() - start
        return Answer(extract_content_from_lm_response(response), wall, self.generated_tokens() - tokens,
                      self.account.score_forwards - forwards)

    def generated_tokens(self) -> int:
        metrics = httpx.get(self.base_url + "/metrics", timeout=30).text
        return int(float(re.search(r"^forerun:generation_tokens_total (\S+)$", metrics, re.M).group(1)))


class Forerun:
    """forerun.scaling's strategies on an engine in this process, P(True) on the same model."""

    def __init__(self, llm: LLM, answer_of, a: argparse.Namespace):
        # keep=False: every answer decodes its own samples, as its_hub's do (forerun scale reuses the
        # samples of an identical earlier request; in a timed comparison that would skip the sampling)
        generator = EngineGenerator(llm, temperature=a.temperature, max_new_tokens=a.max_tokens, seed=a.seed,
                                    spec=SpecConfig(method=a.method), keep=False)
        self.solver = Solver(generator, answer_of, PTrue(ModelScore(llm, generator.account)), DELIMITER,
                             a.max_steps, a.seed)
        self.strategies = {name: build_strategy(name) for _, name in METHODS}

    def answer(self, method: str, question: str, key: str, budget: int) -> Answer:
        start = time.perf_counter()
        outcome = solve(self.strategies[method], self.solver, question, budget)
        wall = time.perf_counter() - start
        text = outcome.chosen.text if outcome.chosen else ""
        return Answer(text, wall, outcome.account.generated_tokens, outcome.account.score_forwards)


# -- running ------------------------------------------------------------------------------------------

def start_server(port: int, a: argparse.Namespace, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "forerun", "serve", "--port", str(port), "--quant", a.quant,
               "--method", a.method, "--log-level", "warning"]
    return subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO)


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 900) -> None:
    if not wait_healthy(proc, f"http://127.0.0.1:{port}/health", timeout, poll=0.5):
        raise RuntimeError(f"forerun serve was not ready (exit status {proc.poll()}); see {log}")


def warm_up(its_hub_side: ItsHub, forerun_side: Forerun) -> None:
    """One untimed short question per side: kernels, buffers and the server's first request."""
    question = "What is 2 + 3? End with the final answer as '#### <number>'."
    its_hub_side.answer("best-of-n", question, "warm-up", 2)
    forerun_side.answer("best-of-n", question, "warm-up", 2)


def run(problems, task, budgets: list[int], sides: dict, journal: Path, done: set | None = None) -> list[dict]:
    """Every question at every budget with every method pair; its_hub first on even questions. Each
    record is also appended to `journal` as it comes, so a run that fails keeps what it measured;
    (id, budget, method) keys in `done` are skipped (a resumed run)."""
    records = []
    for i, problem in enumerate(problems):
        order = list(sides) if i % 2 == 0 else list(reversed(sides))
        for budget in budgets:
            for pair in METHODS:
                if (problem.id, budget, pair[0]) in (done or ()):
                    continue
                record = {"id": problem.id, "budget": budget, "method": pair[0], "reference": problem.reference}
                for side in order:
                    method = pair[0] if side == "its_hub" else pair[1]
                    got = sides[side].answer(method, problem.question, problem.id, budget)
                    record[side] = {"answer": task.answer_of(got.text), "correct": task.check(problem, got.text),
                                    "wall_s": round(got.wall_s, 3), "generated_tokens": got.generated_tokens,
                                    "score_forwards": got.score_forwards, "text": got.text}
                print(f"{problem.id} n={budget} {pair[0]:18s} " + "  ".join(
                    f"{side}: {record[side]['answer']!s:>6} {'ok ' if record[side]['correct'] else 'no '}"
                    f"{record[side]['wall_s']:7.1f}s" for side in sides), flush=True)
                with open(journal, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                records.append(record)
    return records


def summarize(records: list[dict], budgets: list[int]) -> list[dict]:
    rows = []
    for budget in budgets:
        for method, native in METHODS:
            group = [r for r in records if r["budget"] == budget and r["method"] == method]
            sides = {side: _side_summary([r[side] for r in group]) for side in ("its_hub", "forerun")}
            rows.append({"method": method, "forerun_strategy": native, "budget": budget, "questions": len(group),
                         **sides, "forerun_over_its_hub": {
                             "accuracy": _ratio(sides["forerun"]["accuracy"], sides["its_hub"]["accuracy"]),
                             "wall_s": _ratio(sides["forerun"]["wall_s"], sides["its_hub"]["wall_s"]),
                             "median_wall_s_per_question": _ratio(sides["forerun"]["median_wall_s_per_question"],
                                                                  sides["its_hub"]["median_wall_s_per_question"])}})
    return rows


def _side_summary(answers: list[dict]) -> dict:
    walls = [a["wall_s"] for a in answers]
    tokens = [a["generated_tokens"] for a in answers]
    return {"accuracy": sum(a["correct"] for a in answers) / len(answers), "wall_s": round(sum(walls), 3),
            "wall_s_per_question": round(sum(walls) / len(walls), 3),
            "median_wall_s_per_question": round(statistics.median(walls), 3),
            "generated_tokens": None if None in tokens else sum(tokens),
            "score_forwards": sum(a["score_forwards"] for a in answers)}


def _ratio(top: float, bottom: float) -> float | None:
    return round(top / bottom, 3) if bottom else None


def markdown(rows: list[dict]) -> str:
    lines = ["| method | n | its_hub acc | forerun acc | acc ratio | its_hub wall s | forerun wall s | wall ratio "
             "| median s/q its_hub | median s/q forerun | gen tok its_hub | gen tok forerun |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        h, f, ratio = r["its_hub"], r["forerun"], r["forerun_over_its_hub"]
        lines.append(f"| {r['method']} | {r['budget']} | {h['accuracy']:.3f} | {f['accuracy']:.3f} | "
                     f"{_cell(ratio['accuracy'])} | {h['wall_s']:.1f} | {f['wall_s']:.1f} | {_cell(ratio['wall_s'])} | "
                     f"{h['median_wall_s_per_question']:.1f} | {f['median_wall_s_per_question']:.1f} | "
                     f"{h['generated_tokens']} | {f['generated_tokens']} |")
    return "\n".join(lines) + "\n\nratios are forerun / its_hub (accuracy: higher is better; wall: lower is better)\n"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def machine(a: argparse.Namespace) -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "its_hub": its_hub.__version__, "forerun_commit": commit.stdout.strip(),
            "model": f"{MODEL_NAME} (embedded)", "quant": a.quant, "method": a.method}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--task", default="arith", choices=["arith", "gsm8k"])
    p.add_argument("--data", help="GSM8K-format JSONL for --task gsm8k (default: ../shared/data/gsm8k/test.jsonl)")
    p.add_argument("--limit", type=int, default=30, help="first N problems (default: %(default)s)")
    p.add_argument("--budgets", default="4,8", help="comma-separated (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="per sample, and per step for the particle filters")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-steps", type=int, default=8, help="the particle filters' step limit (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", default="q4", choices=["auto", "q4", "none"])
    p.add_argument("--method", default="ar", help="forerun's decoding method, both sides (default: %(default)s)")
    p.add_argument("--port", type=int, default=0, help="for forerun serve (default: a free one)")
    p.add_argument("--out", type=Path, default=Path("its-hub-out"))
    p.add_argument("--resume", action="store_true",
                   help="keep OUT/questions.jsonl and measure only what it lacks (a stopped run goes on)")
    a = p.parse_args()
    budgets = [int(b) for b in a.budgets.split(",") if b.strip()]
    task = build_task(a.task, a.data, a.limit, a.seed)
    problems = task.problems(a.limit)
    a.out.mkdir(parents=True, exist_ok=True)
    journal = a.out / "questions.jsonl"
    kept = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()] \
        if a.resume and journal.exists() else []
    if not a.resume:
        journal.unlink(missing_ok=True)
    port, log = a.port or free_port(), a.out / "server.log"
    begin, load_before = time.perf_counter(), os.getloadavg()
    server = start_server(port, a, log)
    try:
        llm = LLM(quant=a.quant)  # loads while the server loads
        wait_ready(server, port, log)
        sides = {"its_hub": ItsHub(f"http://127.0.0.1:{port}", llm, task.answer_of, a),
                 "forerun": Forerun(llm, task.answer_of, a)}
        warm_up(sides["its_hub"], sides["forerun"])
        ids = {p.id for p in problems}
        kept = [r for r in kept if r["id"] in ids and r["budget"] in budgets]
        done = {(r["id"], r["budget"], r["method"]) for r in kept}
        records = kept + run(problems, task, budgets, sides, journal, done)
    finally:
        stop_process(server)
    rows = summarize(records, budgets)
    table = markdown(rows)
    settings = {k: v for k, v in vars(a).items() if k != "out"}
    results = {"settings": settings, "machine": machine(a), "load_average_before": load_before,
               "load_average_after": os.getloadavg(), "total_wall_s": round(time.perf_counter() - begin, 1),
               "command": "python " + " ".join(sys.argv), "rows": rows, "questions": records}
    (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (a.out / "summary.md").write_text(table)
    print(table)
    print(f"total {results['total_wall_s']} s; wrote {a.out / 'results.json'} and {a.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Automatic drafter choice: each step, each sequence drafts with the candidate expected to commit the
most tokens for the time it costs, judged on every step it could have drafted (full information, as
in HedgeSpec, arXiv 2510.20064), without running the losers' drafts through the target.

Every candidate keeps its own per-request state and observes every step, whichever drafted. After a
step the target's outputs along the committed path say how any draft for that step would have fared:
at committed position j the target's distribution p_j is known (the logits at the accepted node the
path passed through), so a candidate's tree accepts a child of its node at depth j with probability
p_j(its children's tokens) summed (exact for deterministic drafts under recursive rejection sampling;
1 or 0 when greedy, where the committed token is the target's choice), and the walk goes on only
through the child that matches the committed token, since the target was not asked beyond it. So
every candidate is scored on the same committed text, the chosen one included, and

    rate = (expected tokens + 1) / (1 + row_cost * (rows - 1) + drafting seconds / step seconds)

is the candidate's committed tokens per plain step's time. A sequence drafts with the best rate, or
not at all when no candidate beats a plain step (rate 1). Estimates are kept per sequence (a running
mean, recent steps weighing most) and start from the drafter-wide means, which carry across requests.
The candidate that drafts is scored every step; the others draft to be scored every step (those
without a model forward: pld, recycle) or every `probe_every` steps (eagle, medusa), less often while
they keep losing.

The choice only decides which exact draft is verified: greedy output equals plain decoding and
sampling keeps the target's distribution, whichever candidate drafts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace

import torch

from forerun.backoff import Backoff
from forerun.drafters.base import Drafter, Sequence, SequenceView, root_only
from forerun.drafters.registry import drafter_class, register
from forerun.sampling import target_probs
from forerun.types import Draft, Scores, Verdict

# Drafters whose observe() is right for a draft another drafter made: they learn from the committed
# tokens and the target's outputs, not from their own last proposal.
COMBINABLE = ("eagle", "medusa", "pld", "recycle", "retrieval")
# recycle is not among the defaults: its observe (a top-k over the whole vocabulary at every verified
# node) runs every step whoever drafts, and on Spec-Bench auto ran 1.12x ar without it, 1.06x with it
# (one thread; 1.09x and 1.05x on two), at the same acceptance
DEFAULT_CANDIDATES = "eagle,pld"
MAX_PROBE_INTERVAL = 64  # steps: the longest a losing candidate with a model forward goes unscored
MAX_CHEAP_INTERVAL = 4  # and one without: copying (pld) starts suddenly, so it is looked at often


@dataclass(frozen=True)
class AutoOptions:
    candidates: str = ""  # methods (of COMBINABLE) separated by "," or "+"; "" = eagle (where a head fits the target), pld
    probe_every: int = 4  # steps between scorings of a losing candidate that drafts with a model (doubling while it loses)
    row_cost: float = 0.1  # cost of one more verified row, as a fraction of a plain step
    weight: float = 0.3  # of the newest step in a sequence's running estimates
    timed: bool = True  # count drafting time in the cost (off: judge by tokens and rows only)


class _SubView(SequenceView):
    """A candidate's view of a sequence: reads through like the engine's view, with the candidate's
    own per-request state."""

    __slots__ = ("_state",)

    def __init__(self, seq, state: object = None) -> None:
        super().__init__(seq)
        self._state = state

    @property
    def draft_state(self) -> object:
        return self._state

    @draft_state.setter
    def draft_state(self, state: object) -> None:
        self._state = state


@dataclass(eq=False)
class AutoState:
    views: dict[str, _SubView]  # candidate -> its view of the sequence, holding its state
    rate: dict[str, float]  # candidate -> running estimate of its rate for this sequence
    begun: set[str] = field(default_factory=set)  # candidates whose begin() has run
    drafts: dict[str, Draft] = field(default_factory=dict)  # this step's drafts, by candidate, to score
    chosen: str | None = None  # who drafted this step (None: a plain step)
    sent: Draft | None = None  # the chosen draft as handed to the engine (keyed by its candidate)
    steps: int = 0
    probes: dict[str, Backoff] = field(default_factory=dict)  # candidate -> when it next drafts to be scored


class _Timing:
    """Running means of a plain step's seconds per sequence and of each candidate's drafting seconds
    per sequence."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.step: float | None = None
        self.draft: dict[str, float] = {}
        self._last: tuple[float, int] | None = None  # the last propose_batch's start and sequences

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.weight) * old + self.weight * new

    def step_started(self, sequences: int) -> None:
        """Called at each step's drafting: the time since the last one is a step's (per sequence)."""
        now = time.perf_counter()
        if self._last is not None:
            seconds, n = now - self._last[0], self._last[1]
            self.step = self._mix(self.step, seconds / max(n, 1))
        self._last = (now, sequences)

    def drafted(self, name: str, seconds: float, sequences: int) -> None:
        self.draft[name] = self._mix(self.draft.get(name), seconds / max(sequences, 1))

    def share(self, name: str) -> float:
        """Drafting time as a fraction of a step (0 until both are measured)."""
        if self.step is None or name not in self.draft:
            return 0.0
        return self.draft[name] / max(self.step, 1e-9)


@register("auto")
class Auto(Drafter):
    keyed = True  # each draft is keyed by its candidate, so the goodput policy keeps odds per candidate

    def __init__(self, target, spec, candidates: dict[str, Drafter] | None = None):
        super().__init__(target, spec)
        own = {f.name: f.default for f in fields(AutoOptions)}
        mine = {k: v for k, v in spec.options if "." not in k}
        self.opts = AutoOptions(**replace(spec, options=mine).option_values(own))
        if self.opts.probe_every < 1 or self.opts.row_cost < 0 or not 0 < self.opts.weight <= 1:
            raise ValueError(f"auto needs probe_every >= 1, row_cost >= 0 and 0 < weight <= 1; got {self.opts}")
        self.candidates = self._build(spec) if candidates is None else dict(candidates)
        self.drafts_with_model = any(d.drafts_with_model for d in self.candidates.values())
        self.prefill_layers = tuple(sorted({k for d in self.candidates.values() for k in d.prefill_layers}))
        self.prior = {name: 1.0 for name in self.candidates}  # drafter-wide rate estimates
        self.timing = _Timing(self.opts.weight)

    def _build(self, spec) -> dict[str, Drafter]:
        """The candidates, each built from the SpecConfig with its own options (`NAME.OPTION=VALUE`)."""
        # "," or "+" between names: a comma-separated list of methods (forerun bench --methods) takes "+"
        names = [n.strip() for n in (self.opts.candidates or DEFAULT_CANDIDATES).replace("+", ",").split(",") if n.strip()]
        unknown = [n for n in names if n not in COMBINABLE]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"auto: candidates must be distinct methods among {', '.join(COMBINABLE)}; got {names}")
        sub_options = {n: {} for n in names}
        for key, value in spec.options:
            if "." in key:
                name, option = key.split(".", 1)
                if name not in sub_options:
                    raise ValueError(f"auto: option {key!r} names {name!r}, which is not a candidate")
                sub_options[name][option] = value
        built = {}
        for name in names:
            sub = replace(spec, method=name, options=sub_options[name])
            try:
                built[name] = drafter_class(name)(self.target, sub)
            except ValueError:
                # eagle among the default candidates needs a head that fits the target: without one, skip it
                if self.opts.candidates or name != "eagle" or sub_options[name]:
                    raise
        return built

    # -- per-request state ----------------------------------------------------------------------------

    def begin(self, seq: Sequence) -> AutoState:
        state = AutoState(views={n: _SubView(seq._seq) for n in self.candidates}, rate=dict(self.prior))
        for name, drafter in self.candidates.items():
            state.views[name].draft_state = drafter.begin(state.views[name])
            state.begun.add(name)
        return state

    def fork(self, parent: Sequence, child: Sequence) -> AutoState:
        mine: AutoState = parent.draft_state
        state = AutoState(views={n: _SubView(child._seq) for n in self.candidates}, rate=dict(mine.rate))
        for name, drafter in self.candidates.items():
            view = state.views[name]
            view.draft_state = drafter.fork(mine.views[name], view)
            if view.draft_state is None:
                view.draft_state = drafter.begin(view)
            state.begun.add(name)
        return state

    def end(self, seq: Sequence) -> None:
        state: AutoState = seq.draft_state
        for name in state.begun:
            self.candidates[name].end(state.views[name])
        for name, rate in state.rate.items():  # what this request learnt carries to the next ones
            self.prior[name] = 0.5 * self.prior[name] + 0.5 * rate

    def layers_wanted(self, seq: Sequence) -> tuple[int, ...]:
        state: AutoState = seq.draft_state
        return tuple(sorted({k for n, d in self.candidates.items() for k in d.layers_wanted(state.views[n])}))

    def observe_prefill(self, seq: Sequence, start: int, layers: dict[int, torch.Tensor]) -> None:
        state: AutoState = seq.draft_state
        for name, drafter in self.candidates.items():
            if drafter.prefill_layers:
                drafter.observe_prefill(state.views[name], start, {k: layers[k] for k in drafter.prefill_layers})

    # -- drafting -------------------------------------------------------------------------------------

    def propose(self, seq: Sequence, depth: int) -> Draft:
        return self.propose_batch([seq], [depth])[0]

    def propose_batch(self, seqs: list[Sequence], depths: list[int]) -> list[Draft]:
        """Each candidate drafts, in one batch, for the sequences it is chosen for and those it is
        scored on this step; each sequence gets its chosen candidate's draft, keyed by the candidate."""
        self.timing.step_started(len(seqs))
        states: list[AutoState] = [seq.draft_state for seq in seqs]
        for state in states:
            state.steps += 1
            state.drafts.clear()
            best = max(state.rate, key=state.rate.get)
            state.chosen = best if state.rate[best] > 1.0 else None
        out: list[Draft] = [root_only(seq) for seq in seqs]
        for name, drafter in self.candidates.items():
            batch = [i for i, s in enumerate(states) if self._drafts(name, s)]
            if not batch:
                continue
            start = time.perf_counter()
            drafts = drafter.propose_batch([states[i].views[name] for i in batch], [depths[i] for i in batch])
            self.timing.drafted(name, time.perf_counter() - start, len(batch))
            for i, draft in zip(batch, drafts):
                states[i].drafts[name] = draft
                if states[i].chosen == name:
                    out[i] = states[i].sent = replace(draft, key=(name, draft.key))
        return out

    def _drafts(self, name: str, state: AutoState) -> bool:
        """Whether `name` drafts for the sequence this step: chosen, or due a scoring."""
        return state.chosen == name or name not in state.probes or state.probes[name].due(state.steps)

    # -- feedback -------------------------------------------------------------------------------------

    def observe(self, seq: Sequence, draft: Draft, verdict: Verdict, scores: Scores) -> None:
        state: AutoState = seq.draft_state
        for name, drafter in self.candidates.items():
            # the chosen candidate gets back its own draft object if the engine verified it uncut
            own = state.drafts[name] if name == state.chosen and draft is state.sent else draft
            drafter.observe(state.views[name], own, verdict, scores)
        state.sent = None
        if not state.drafts:
            return  # a plain step no one drafted for
        committed = seq.tokens[len(seq.tokens) - verdict.accepted - 1:]  # the path's tokens, then the next
        probs = None if seq.params.greedy else target_probs(scores.logits[verdict.path].float(), seq.params)
        w = self.opts.weight
        for name, hypothesis in state.drafts.items():
            rate = (expected_tokens(hypothesis, committed, probs) + 1) / self._cost(name, hypothesis)
            state.rate[name] = (1 - w) * state.rate[name] + w * rate
        best = max(state.rate, key=state.rate.get)
        for name, hypothesis in state.drafts.items():
            if name != state.chosen:
                self._schedule_probe(state, name, hypothesis, still_losing=name != best)
        state.drafts.clear()

    def _schedule_probe(self, state: AutoState, name: str, hypothesis: Draft, still_losing: bool) -> None:
        """When a candidate not chosen drafts again to be scored. One with a model forward: next step
        while the sequence is young and it could not draft yet (its head has not seen the context),
        otherwise after an interval from probe_every that doubles up to MAX_PROBE_INTERVAL while it keeps
        losing. One without: every step, less often (up to every MAX_CHEAP_INTERVAL steps) while it keeps
        losing, since even a cheap tree costs Python time each step. Once it leads, from the start again."""
        model = self.candidates[name].drafts_with_model
        if name not in state.probes:
            state.probes[name] = Backoff(*((self.opts.probe_every, MAX_PROBE_INTERVAL) if model else (1, MAX_CHEAP_INTERVAL)))
        probes = state.probes[name]
        if model and hypothesis.size == 1 and state.steps < self.opts.probe_every:
            probes.recheck_at(state.steps + 1)
            return
        probes.checked(state.steps, confirmed=still_losing)

    def _cost(self, name: str, draft: Draft) -> float:
        """A step with this draft, in plain steps' time: its extra rows and its drafting."""
        drafting = self.timing.share(name) if self.opts.timed else 0.0
        return 1.0 + self.opts.row_cost * (draft.rows - 1) + drafting


def expected_tokens(draft: Draft, committed: list[int], probs: torch.Tensor | None) -> float:
    """The draft tokens the target would accept, in expectation, had `draft` been verified where the
    committed tokens were: committed[j] is the token the target took at depth j + 1 and probs[j] its
    distribution there ([J, V], None when greedy: the committed token was its only choice)."""
    tokens, kids = draft.tree.tokens.tolist(), draft.tree.children
    expected, reach, node = 0.0, 1.0, 0
    for j, token in enumerate(committed):
        children = kids[node]
        if not children:
            break
        if probs is None:
            p = 1.0 if any(tokens[c] == token for c in children) else 0.0
        else:
            p = min(float(probs[j, sorted({tokens[c] for c in children})].sum()), 1.0)
        reach *= p
        expected += reach
        node = next((c for c in children if tokens[c] == token), None)
        if node is None or reach == 0.0:
            break
    return expected

"""DEL: a dynamic exit layer and speculation length for layer-skip self-speculation
(Zarch et al. 2025, "DEL: Context-Aware Dynamic Exit Layer for Efficient Self-Speculative Decoding").

Drafting is layer-skip's (forerun.drafters.layer_skip.draft_chains); what DEL adds is the choice of
exit layer l and length d at every step. It keeps, for each candidate exit layer, a decayed estimate
of alpha_l, the chance that layer l's shallow prediction equals the target's token. The estimate
comes from *shadow tokens*: the verification forward computes every layer's hidden state for the
accepted path anyway: on a probe step the drafter asks for the candidate layers' residual streams
(Drafter.layers_wanted, returned in Scores.layers), and one batched pass through the final norm and
head says what each layer would have drafted there. No extra forward.

Each step maximises expected tokens per unit of time (the paper's tokens-per-layer, with the head's
cost counted, since for small models it is a large share of a forward):

    E[tokens](l, d) = (1 - alpha_l^(d+1)) / (1 - alpha_l)          (geometric acceptance)
    cost(l, d)      = 1 + slope * d + d * c_l                       (one verification + d drafts)
    c_l             = (l * layer + head) / (L * layer + head)       (parameter counts)

d = 0 (plain decoding) is always a candidate, so DEL never does worse than AR by much where shallow
exits disagree with the full model: it keeps probing and drafts once some layer earns it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from forerun.drafters.base import Drafter, SequenceView, root_only
from forerun.drafters.layer_skip import draft_chains
from forerun.drafters.registry import register
from forerun.types import Draft, Scores


@dataclass(frozen=True, slots=True)
class DelOptions:
    layers: str = ""  # candidate exit layers, comma-separated; "" = up to 7 evenly spaced
    probe_every: int = 2  # steps per shadow-token probe (a probe costs one head pass over path x layers)
    decay: float = 0.9  # weight kept by older observations at each probe
    slope: float = 0.1  # extra cost of each verified token, in units of one single-token forward
    min_length: int = 0  # never draft fewer tokens (0 lets DEL fall back to plain decoding)


@dataclass(eq=False)
class DelState:
    """One request's estimates: decayed hits and trials of each candidate exit layer (per request, as
    the paper's are context-aware; a new request starts from where the last finished one ended)."""

    hits: dict[int, float]
    trials: dict[int, float]
    steps: int = 0
    probing: bool = False  # this step's verification returns the candidate layers' states


@register("del")
class DynamicExit(Drafter):
    drafts_with_model = writes_target_kv = plans_length = True

    def __init__(self, target, spec):
        super().__init__(target, spec)
        self.opts = DelOptions(**spec.option_values({f.name: f.default for f in fields(DelOptions)}))
        args = target.model.args
        self.layers = _candidate_layers(self.opts.layers, args.num_layers)
        self.cost = _draft_costs(args, self.layers)
        # Persistent: where the last finished request's estimates ended, the next one's start
        # (alpha = 0.5, worth two observations, before any).
        self.prior = DelState(hits={layer: 1.0 for layer in self.layers}, trials={layer: 2.0 for layer in self.layers})

    def begin(self, seq: SequenceView) -> DelState:
        return DelState(hits=dict(self.prior.hits), trials=dict(self.prior.trials))

    def end(self, seq: SequenceView) -> None:
        state: DelState = seq.draft_state
        self.prior = DelState(hits=dict(state.hits), trials=dict(state.trials))

    def plan(self, state: DelState) -> tuple[int, int]:
        """(exit layer, speculation length) with the most expected tokens per unit of cost."""
        best, choice = 1.0, (self.layers[-1], 0)  # d = 0: one token per forward
        lengths = range(max(self.opts.min_length, 1), self.spec.max_draft + 1)
        if self.opts.min_length > 0:
            best = 0.0
        for layer in self.layers:
            a = min(state.hits[layer] / state.trials[layer], 0.999)
            for d in lengths:
                rate = (1 - a ** (d + 1)) / (1 - a) / (1 + self.opts.slope * d + d * self.cost[layer])
                if rate > best:
                    best, choice = rate, (layer, d)
        return choice

    def propose_batch(self, seqs: list[SequenceView], depths: list[int]) -> list[Draft]:
        """Each sequence drafts at the exit layer it plans; the sequences that exit at one layer draft
        together, one shallow forward per depth."""
        drafts: list[Draft | None] = [None] * len(seqs)
        by_layer: dict[int, list[tuple[int, int]]] = {}  # exit layer -> (sequence, length)
        for b, (seq, depth) in enumerate(zip(seqs, depths)):
            state: DelState = seq.draft_state
            layer, length = self.plan(state)
            state.steps += 1
            state.probing = state.steps % self.opts.probe_every == 0
            if min(length, depth):
                by_layer.setdefault(layer, []).append((b, min(length, depth)))
            else:
                drafts[b] = root_only(seq)
        for layer, group in by_layer.items():
            chains = draft_chains(self.target.model, [seqs[b] for b, _ in group], layer, [n for _, n in group])
            for (b, _), draft in zip(group, chains):
                drafts[b] = draft
        return drafts

    def propose(self, seq: SequenceView, depth: int) -> Draft:
        return self.propose_batch([seq], [depth])[0]

    def layers_wanted(self, seq: SequenceView) -> tuple[int, ...]:
        return tuple(self.layers) if seq.draft_state.probing else ()

    def observe(self, seq: SequenceView, draft: Draft, verdict, scores: Scores) -> None:
        state: DelState = seq.draft_state
        if state.probing and all(layer in scores.layers for layer in self.layers):
            self._learn(state, draft, verdict, scores)
        state.probing = False

    def _learn(self, state: DelState, draft: Draft, verdict, scores: Scores) -> None:
        """Shadow tokens: what each candidate layer predicts at each accepted node, against the token
        the target produced there."""
        model = self.target.model
        path = torch.tensor(verdict.path)
        truth = torch.tensor(draft.tree.tokens[path[1:]].tolist() + [verdict.next_token])  # [A]
        states = torch.stack([scores.layers[layer][path] for layer in self.layers])  # [C, A, hidden]
        shadow = model.head(model.norm(states.flatten(0, 1))).argmax(-1).view(len(self.layers), -1).cpu()
        matches = (shadow == truth).sum(-1).tolist()  # [C]
        decay = self.opts.decay
        for layer, hit in zip(self.layers, matches):
            state.hits[layer] = decay * state.hits[layer] + hit
            state.trials[layer] = decay * state.trials[layer] + len(truth)


def _candidate_layers(spec: str, num_layers: int) -> list[int]:
    if spec:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    else:
        layers = sorted({round(num_layers * k / 8) for k in range(1, 8)})
        layers = [layer for layer in layers if 1 <= layer < num_layers] or [1]
    if not layers or layers[0] < 1 or layers[-1] >= num_layers:
        raise ValueError(f"del: candidate exit layers must lie in 1..{num_layers - 1}, got {spec!r}")
    return layers


def _draft_costs(args, layers: list[int]) -> dict[int, float]:
    """Cost of one draft token at each exit layer, relative to a full single-token forward."""
    h, hd = args.hidden_size, args.head_dim
    block = (args.num_heads * 2 + args.num_kv_heads * 2) * hd * h + 3 * h * args.intermediate_size
    head = args.vocab_size * h
    full = args.num_layers * block + head
    return {layer: (layer * block + head) / full for layer in layers}

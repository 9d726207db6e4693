"""EAGLE-3: a trained draft head reading the target's own features (forerun.heads.eagle3).

Each verification forward returns, at the accepted nodes, the target's residual streams after the
head's three layers (Drafter.layers_wanted; the prompt's come through observe_prefill). They become
the head's committed rows: row i holds (f_i, x_{i+1}), so the last one, at the position before the
root, scores the root's first child. Drafting runs the head on its own output from there:

- chain (tree_width 1): one head row per drafted token, the most likely draft token when greedy, one
  drawn from the head's distribution (temperature, top-k and top-p applied; Draft.q) when sampling;
- tree (tree_width w > 1, EAGLE-2's dynamic tree): each depth expands the w best leaves so far by the
  head's cumulative confidence, w children each, in one head forward for all of them; of every node
  drafted, the `nodes` most confident make the tree. Its children are chosen deterministically, so the
  verifier treats them as point masses, which keeps sampling exact too.

Both stop where the head doubts itself. A node's confidence is the head's probability of the path
from the root to it (a product along the path); EAGLE-2 builds its trees on it because it tracks the
chance the target accepts that path. It tracks it up to a factor, though: a head drafting text unlike
its training data is overconfident (the shipped head's paths of confidence 0.3-0.4 were accepted 19%
of the time on Spec-Bench chat). So the drafter keeps that factor, accepted nodes over the sum of
their confidences (a running mean over the last few hundred nodes it drafted), and a node whose
confidence times the factor is below `min_accept` is neither drafted nor verified: it would cost a
head row and a verification row for a token the target probably rejects. A step where even the first
token is that doubtful verifies the root alone, as `ar` does. The rule reads only the drafter's own
numbers and past steps' outcomes, never this step's target, so greedy and sampled outputs stay exact.

The head keeps a KV cache of its own per sequence (a few kB a token: one layer, its kv heads), in the
sequence's draft state rather than in the engine's pool: it is a different shape from the target's, and
drafted rows are dropped after every step. Its rows attend to the last `window` committed rows (256),
about the span the shipped head was trained on (96 prompt rows and a reply of up to 256 tokens): on
Spec-Bench the window changed no acceptance and spared the head the rest of long prompts (only the
window's rows of a prompt are run through it). Rows the prefix cache spared the target (a cached prompt) are
never seen, so the head drafts from what it has; outputs never depend on it.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import torch

from forerun.drafters.base import Drafter, Sequence, root_only
from forerun.drafters.registry import register
from forerun.heads.eagle3 import Eagle3Head, HeadCache, HeadRows, load_head
from forerun.heads.online import LearnConfig, OnlineLearner, Record
from forerun.heads.train import target_rows
from forerun.sampling import sample, target_probs
from forerun.tree import Tree
from forerun.types import Draft, Scores, Verdict

SHIPPED_HEAD = "smollm2-135m-instruct-eagle3"  # forerun/heads/<this>: the head for the embedded model


@dataclass(frozen=True, slots=True)
class EagleOptions:
    head: str = ""  # head folder (speculators or original EAGLE-3 layout); "" = the one shipped for the embedded model
    nodes: int = 16  # tree: nodes kept below the root
    weights: str = "q8"  # how the head's projections run on the CPU: q8 or q4 blocks, or float32
    min_accept: float = 0.2  # draft a node only if the target is expected to accept it this often (0: always)
    window: int = 256  # the head attends to this many committed rows before a step (0: all of them)
    learn: bool = False  # keep training the head on the verified text as it is served (forerun.heads.online)
    learn_lr: float = LearnConfig().lr
    learn_passes: float = LearnConfig().passes
    learn_fc: bool = LearnConfig().fc


@dataclass(eq=False)
class EagleState:
    cache: HeadCache
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # committed rows not yet run: (tokens, features, positions)
    last: tuple[torch.Tensor, torch.Tensor, int] | None = None  # the last committed row's output, logits, position
    confidence: list[float] | None = None  # the head's confidence in each node of the last draft (root first)
    drafted: Draft | None = None  # that draft: its confidences are checked only if it is the one verified
    record: Record | None = None  # with learn: the rows not yet handed to the learner


class _Chain:
    """One sequence's chain while it is drafted: its tokens, their confidences and q rows so far, and
    the head's output at its last token."""

    def __init__(self, seq: Sequence, state: EagleState, depth: int):
        self.seq, self.state, self.depth = seq, state, depth
        self.hidden, self.logits, _ = state.last
        self.tokens, self.qs, self.confidence = [seq.root], [], [1.0]


class Calibration:
    """How far the head's confidence in a path overstates the chance the target accepts it: accepted
    nodes over the sum of their confidences, a running mean with a horizon of about `horizon` nodes,
    starting from 1 (taking the head at its word)."""

    def __init__(self, horizon: int = 400, prior: float = 8.0):
        self.decay = 1.0 - 1.0 / horizon
        self.accepted = self.confidence = prior

    @property
    def factor(self) -> float:
        return self.accepted / self.confidence

    def record(self, confidence: float, accepted: bool) -> None:
        self.accepted = self.decay * self.accepted + accepted
        self.confidence = self.decay * self.confidence + confidence

    def floor(self, min_accept: float) -> float:
        """The least confidence worth drafting."""
        return min_accept / max(self.factor, 1e-3)


def shipped_head() -> Path:
    return Path(str(resources.files("forerun.heads") / SHIPPED_HEAD))


_LOADED: dict[tuple[str, int], Eagle3Head] = {}  # (folder, id of the target model) -> its head, loaded once


def _head(path: Path, target) -> Eagle3Head:
    """The head in `path` for `target`, shared by every SpecConfig that names it (a server builds one
    drafter per configuration; the head is read once)."""
    if not (path / "config.json").is_file():
        raise ValueError(f"eagle: no head at {path} (give head=PATH or --draft-head)")
    key = (str(path.resolve()), id(target.model))
    if key not in _LOADED:
        if len(_LOADED) >= 8:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = load_head(path, target)
    return _LOADED[key]


@register("eagle")
class Eagle(Drafter):
    drafts_with_model = True

    def __init__(self, target, spec, head: Eagle3Head | None = None):
        super().__init__(target, spec)
        self.opts = EagleOptions(**spec.option_values({f.name: f.default for f in fields(EagleOptions)}))
        if self.opts.nodes < 1:
            raise ValueError(f"eagle: nodes must be >= 1, got {self.opts.nodes}")
        if not 0.0 <= self.opts.min_accept < 1.0:
            raise ValueError(f"eagle: min_accept must be in [0, 1), got {self.opts.min_accept}")
        if self.opts.window < 0:
            raise ValueError(f"eagle: window must be >= 0, got {self.opts.window}")
        if self.opts.weights not in ("q8", "q4", "float32"):
            raise ValueError(f"eagle: weights must be q8, q4 or float32, got {self.opts.weights!r}")
        self.head = head if head is not None else _head(Path(self.opts.head or shipped_head()), target)
        self.learner = None
        if self.opts.learn:  # a head of its own, which the learner's weights overwrite
            self.head = self.head.unpacked_copy()
            self.learner = OnlineLearner(self.head, target_rows(target, self.head.draft_ids),
                                         LearnConfig(lr=self.opts.learn_lr, passes=self.opts.learn_passes,
                                                     fc=self.opts.learn_fc))
        if target.device.type == "cpu" and getattr(self.head, "fast", None) is None:
            self._pack()
        self.aux = tuple(self.head.config.aux_layers)
        self.prefill_layers = self.aux
        self.draft_ids = self.head.draft_ids
        self.calibration = Calibration()

    def _pack(self) -> None:
        self.head.pack_for_cpu(self.opts.weights if self.opts.weights != "float32" else None)

    def begin(self, seq: Sequence) -> EagleState:
        return EagleState(self.head.new_cache(self.opts.window), [], record=Record() if self.learner else None)

    def fork(self, parent: Sequence, child: Sequence) -> EagleState:
        """The samples of an n > 1 request start from the prompt rows the head saw for the first."""
        state: EagleState = parent.draft_state
        return EagleState(state.cache.copy(), list(state.pending), state.last,
                          record=Record() if self.learner else None)

    def end(self, seq: Sequence) -> None:
        state = seq.draft_state
        if self.learner is not None and isinstance(state, EagleState) and state.record is not None:
            self.learner.flush(state.record)

    def layers_wanted(self, seq: Sequence) -> tuple[int, ...]:
        return self.aux

    # -- what the target computed -------------------------------------------------------------------

    def _commit_rows(self, state: EagleState, features: torch.Tensor, tokens: list[int], first: int) -> None:
        """Rows at positions first.. from the target's features there and the tokens after them; any
        rows at those positions or later (a recomputed stretch, a rejected draft) give way."""
        state.cache.keep_before(first)
        state.pending = [p for p in state.pending if int(p[2][0]) < first]
        if state.last is not None and state.last[2] >= first:
            state.last = None
        # fc runs when the rows do (_catch_up): once for every row committed since the last draft, and
        # never for rows older than the window (a long prompt's, or steps another drafter took under auto)
        state.pending.append((torch.tensor(tokens), features, torch.arange(first, first + len(tokens))))

    def observe_prefill(self, seq: Sequence, start: int, layers: dict[int, torch.Tensor]) -> None:
        features = torch.cat([layers[k] for k in self.aux], dim=-1)
        n = features.shape[0]
        tokens = seq.tokens[start + 1:start + n + 1]
        self._commit_rows(seq.draft_state, features, tokens, start)
        if self.learner is not None:
            self.learner.add(seq.draft_state.record, features[:len(tokens)], tokens, start)

    def observe(self, seq: Sequence, draft: Draft, verdict: Verdict, scores: Scores) -> None:
        state: EagleState = seq.draft_state
        own = state.drafted is draft  # not cut by the policy, nor another drafter's (auto)
        if own:
            on_path = set(verdict.path)
            for node in range(1, draft.size):
                self.calibration.record(state.confidence[node], node in on_path)
        state.confidence = state.drafted = None
        if not all(k in scores.layers for k in self.aux):
            return
        path = torch.tensor(verdict.path)
        features = torch.cat([scores.layers[k][path] for k in self.aux], dim=-1)
        tokens = draft.tree.tokens[path[1:]].tolist() + [verdict.next_token]
        root = len(seq.tokens) - len(tokens) - 1  # seq already holds the accepted tokens and the next one
        self._commit_rows(seq.draft_state, features, tokens, root)
        if self.learner is not None:  # the head had row j's token right where it was its accepted draft
            drafted = torch.arange(len(tokens)) < (verdict.accepted if own else 0)
            self.learner.add(state.record, features, tokens, root, scores.hidden[path], scores.logits[path].argmax(-1),
                             drafted)

    # -- drafting -------------------------------------------------------------------------------------

    def _catch_up(self, states: list[EagleState]) -> None:
        """Run the committed rows not yet run, of every sequence at once, keeping each one's last output."""
        behind = [state for state in states if state.pending]
        if not behind:
            return
        keep = slice(-self.opts.window, None) if self.opts.window else slice(None)  # older rows: keys no step reads
        rows = []
        for state in behind:
            rows.append([torch.cat([p[j] for p in state.pending])[keep] for j in range(3)])
            state.pending = []
        tokens, features, positions = zip(*rows)
        hidden = self.head.features(torch.cat(features)).split([len(t) for t in tokens])
        items = [HeadRows(s.cache, t, h, p) for s, t, h, p in zip(behind, tokens, hidden, positions)]
        for state, it, (out, logits) in zip(behind, items, self.head.step_batch(items, last_only=True)):
            state.last = (out[-1], logits[-1], int(it.positions[-1]))

    def propose(self, seq: Sequence, depth: int) -> Draft:
        return self.propose_batch([seq], [depth])[0]

    def propose_batch(self, seqs: list[Sequence], depths: list[int]) -> list[Draft]:
        """Every sequence's draft, the head's rows for all of them in one forward per depth (a tree
        drafts alone: its rows per depth depend on its own confidences)."""
        states: list[EagleState] = [seq.draft_state for seq in seqs]
        self._take_learned()
        self._catch_up(states)
        drafts: list[Draft | None] = [None] * len(seqs)
        chains = []
        for i, (seq, state, depth) in enumerate(zip(seqs, states, depths)):
            if state.last is None or state.last[2] != len(seq.tokens) - 2:  # the head has not seen the root's context
                drafts[i] = root_only(seq)
            elif self.spec.tree_width > 1:
                committed = state.cache.length
                try:
                    drafts[i] = self._tree(seq, state, depth, len(seq.tokens) - 1)
                finally:
                    state.cache.truncate(committed)
            else:
                chains.append(_Chain(seq, state, depth))
        if chains:
            for i, draft in zip([i for i, d in enumerate(drafts) if d is None], self._chains(chains)):
                drafts[i] = draft
        return drafts

    def _take_learned(self) -> None:
        """With learn: the learner's newest weights, if it offers any, in place of the head's (between
        steps, so a draft never mixes two heads; the rows already in the head's caches stay as they were
        computed)."""
        learned = self.learner.take() if self.learner is not None else None
        if learned is None:
            return
        self.head.load_state_dict(learned, strict=False)
        if getattr(self.head, "fast", None) is not None:
            self._pack()

    def _distribution(self, logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """The head's distribution over the draft vocabulary: as it is when greedy (its argmax is the
        draft), processed like the target's (temperature, top-k, top-p) when sampling."""
        if seq.params.greedy:
            return torch.softmax(logits.float(), dim=-1)
        return target_probs(logits.float()[None], seq.params)[0]

    def _chains(self, chains: list[_Chain]) -> list[Draft]:
        """Chains for several sequences, one head forward per depth for those still drafting.

        Whether to draft a chain's next token is decided before it is drawn, from the confidence of
        the path so far times the head's top probability there: a rule that looked at the drawn token
        would make the drafted tokens follow the head's distribution cut to its likelier tokens, not
        the q the verifier is told, and sampling would no longer be exact."""
        floor = self.calibration.floor(self.opts.min_accept)
        committed = [c.state.cache.length for c in chains]
        try:
            live = chains
            for d in range(1, max(c.depth for c in chains) + 1):
                stepping = []
                for c in live:
                    probs = self._distribution(c.logits, c.seq)
                    if c.confidence[-1] * float(probs.max()) < floor:
                        continue
                    greedy = c.seq.params.greedy
                    j = int(probs.argmax()) if greedy else sample(probs, c.seq.generator)
                    c.tokens.append(int(self.draft_ids[j]))
                    c.confidence.append(c.confidence[-1] * float(probs[j]))
                    if not greedy:
                        q = torch.zeros(self.target.model.args.vocab_size)
                        q[self.draft_ids] = probs
                        c.qs.append(q)
                    if d < c.depth:
                        stepping.append(c)
                if not stepping:
                    break
                root = [len(c.seq.tokens) - 1 for c in stepping]
                rows = [HeadRows(c.state.cache, torch.tensor([c.tokens[-1]]), c.hidden[None], torch.tensor([r + d - 1]))
                        for c, r in zip(stepping, root)]
                for c, (out, logits) in zip(stepping, self.head.step_batch(rows)):
                    c.hidden, c.logits = out[0], logits[0]
                live = stepping
        finally:
            for c, length in zip(chains, committed):
                c.state.cache.truncate(length)
        drafts = []
        for c in chains:
            q = torch.stack([torch.zeros_like(c.qs[0]), *c.qs]) if c.qs else None  # row 0: the root, never drawn
            c.state.confidence = c.confidence
            c.state.drafted = Draft(Tree(tokens=torch.tensor(c.tokens), parents=list(range(-1, len(c.tokens) - 1))), q=q)
            drafts.append(c.state.drafted)
        return drafts

    def _tree(self, seq: Sequence, state: EagleState, depth: int, root_position: int) -> Draft:
        """EAGLE-2: expand the `width` most confident leaves each depth; keep the most confident nodes."""
        width, budget = self.spec.tree_width, min(self.opts.nodes, seq.room - 1)
        floor = math.log(self.calibration.floor(self.opts.min_accept)) if self.opts.min_accept > 0 else -math.inf
        hidden, logits, _ = state.last
        committed = state.cache.length
        # node j (1-based; 0 is the root): token, parent, cumulative log-probability, depth, cache row
        tokens, parents, score, depths, rows = [seq.root], [-1], [0.0], [0], [-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = logp.topk(width)
        frontier = []
        for v, j in zip(top.values.tolist(), top.indices.tolist()):
            if v < floor:
                break
            tokens.append(int(self.draft_ids[j])), parents.append(0), score.append(v), depths.append(1), rows.append(-1)
            frontier.append(len(tokens) - 1)
        inputs = {0: hidden}  # node -> the hidden state its children's rows read
        for d in range(1, depth):
            frontier = heapq.nlargest(width, frontier, key=lambda n: score[n])
            if not frontier:
                break
            # one head forward over the frontier: each row sees the committed rows and its own ancestors
            start = state.cache.length
            for n in frontier:
                rows[n] = start + frontier.index(n)
            mask = torch.zeros(len(frontier), start + len(frontier) - committed, dtype=torch.bool)
            for i, n in enumerate(frontier):
                a = n
                while a > 0:
                    mask[i, rows[a] - committed] = True
                    a = parents[a]
            out, lg = self.head.step(state.cache, torch.tensor([tokens[n] for n in frontier]),
                                     torch.stack([inputs[parents[n]] for n in frontier]),
                                     torch.tensor([root_position + depths[n] - 1 for n in frontier]),
                                     mask=mask, visible=committed)
            logp = torch.log_softmax(lg.float(), dim=-1)
            top = logp.topk(width, dim=-1)
            new = []
            for i, n in enumerate(frontier):
                inputs[n] = out[i]
                for v, j in zip(top.values[i].tolist(), top.indices[i].tolist()):
                    if score[n] + v < floor:
                        break
                    tokens.append(int(self.draft_ids[j])), parents.append(n), score.append(score[n] + v)
                    depths.append(d + 1), rows.append(-1)
                    new.append(len(tokens) - 1)
            frontier = new
        kept: set[int] = set()
        for n in sorted(range(1, len(tokens)), key=lambda n: (-score[n], n)):  # a parent sorts before its children
            if len(kept) == budget:
                break
            if parents[n] == 0 or parents[n] in kept:
                kept.add(n)
        keep = [0] + sorted(kept, key=lambda n: (depths[n], n))
        index = {n: i for i, n in enumerate(keep)}
        state.confidence = [math.exp(score[n]) for n in keep]
        state.drafted = Draft(Tree(tokens=torch.tensor([tokens[n] for n in keep]),
                                   parents=[-1] + [index[parents[n]] for n in keep[1:]]))
        return state.drafted

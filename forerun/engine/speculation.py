"""The speculation stage of a step, between schedule and commit: every decoding sequence's draft
before the forward, the verdicts on its outputs after it, then what the drafters and the policies
learn from them.

    drafts = speculation.propose(work)       # depth planned, drafted per drafter for all its sequences, cut
    out = model(pack(work, drafts), kv, keep_layers=speculation.layers_wanted(work, drafts))
    speculation.observe_prefill(work, batch, out)
    verdicts, scores = speculation.verify(work, drafts, batch, out)
    ...                                      # the engine commits each sequence, then for each:
    speculation.observe(seq, draft, verdict, scores)
    speculation.record(work, drafts, verdicts, rows, seconds)

It keeps what is learnt per SpecConfig across requests: the drafter, the SpeedGuard and the goodput
policy's odds (forget(spec) drops them). Drafters see sequences only through their views.
"""
from __future__ import annotations

import time

from torch import Tensor

from forerun.config import EngineConfig, SpecConfig
from forerun.drafters.base import Drafter, root_only
from forerun.drafters.registry import build_drafter
from forerun.engine.draft_length import DraftLength, SpeedGuard
from forerun.engine.goodput import Drafting, Entry, Goodput, keep_nodes
from forerun.engine.kv_pool import KVPool
from forerun.engine.scheduler import Work
from forerun.engine.sequence import Sequence
from forerun.models.batch import ForwardBatch, ForwardOutput
from forerun.types import Draft, Scores, Verdict
from forerun.verify import verify_batch

RATIO_DECAY = 0.8  # per verified draft, of a sequence's accepted and expected draft tokens


class Speculation:
    """Drafting and verification for a step's batch, and what they keep per SpecConfig."""

    def __init__(self, runtime, pool: KVPool, config: EngineConfig, context_length: int):
        self.runtime = runtime
        self.pool = pool
        self.config = config
        self.context_length = context_length  # tokens a sequence may hold (Engine.context_length)
        self.goodput = Goodput()
        self.drafters: dict[SpecConfig, Drafter] = {}  # one per SpecConfig, kept across requests
        self.guards: dict[SpecConfig, SpeedGuard] = {}

    # -- what is kept per SpecConfig ------------------------------------------------------------------

    def drafter(self, spec: SpecConfig) -> Drafter:
        if spec not in self.drafters:
            self.drafters[spec] = build_drafter(self.runtime, spec)
        return self.drafters[spec]

    def draft_length(self, spec: SpecConfig) -> DraftLength:
        """A new sequence's draft length, with its SpecConfig's guard."""
        return DraftLength(spec, self.guards.setdefault(spec, SpeedGuard()) if spec.guard else None)

    def forget(self, spec: SpecConfig) -> None:
        self.drafters.pop(spec, None)
        self.guards.pop(spec, None)
        self.goodput.forget(spec)

    # -- a sequence's drafter state -------------------------------------------------------------------

    def begin(self, seq: Sequence) -> None:
        """The drafter's per-request state for seq, made once: at its first draft, or earlier when its
        drafter reads its prompt rows."""
        if not seq.begun:
            seq.draft_state, seq.begun = self.drafter(seq.spec).begin(seq.view), True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """A new sample of parent's request starts from what its drafter saw of the shared prompt."""
        if parent.begun:
            child.draft_state = self.drafter(parent.spec).fork(parent.view, child.view)
            child.begun = child.draft_state is not None

    def end(self, seq: Sequence) -> None:
        if seq.begun:
            self.drafter(seq.spec).end(seq.view)
        seq.draft_state = None

    # -- before the forward ---------------------------------------------------------------------------

    def propose(self, work: list[Work]) -> dict[int, Draft]:
        """Every decoding sequence's draft, by its index in `work`: depth from its DraftLength (or
        the goodput policy), drafted by its drafter for all its sequences at once, cut by the goodput
        policy, and cut to its root if the pool cannot hold its rows. A drafter that writes the
        target's K/V drafts only once the prefix is cached."""
        decoding = [i for i, w in enumerate(work) if w.decode]
        depth = {i: self._depth(work[i]) for i in decoding}
        checked = self._checks(work, decoding, depth)
        self._plan_depths(work, decoding, depth, checked)
        drafts = self._draft(work, decoding, depth)
        _cut_to_grammar(work, drafts)
        self._cut(work, drafts, checked)
        _add_forced(work, drafts)
        for i, draft in drafts.items():
            w = work[i]
            if draft.rows > 1 and not self.pool.reserve(w.seq, w.seq.cached + w.chunk + draft.rows):
                drafts[i] = root_only(w.seq.view)
        return drafts

    def layers_wanted(self, work: list[Work], drafts: dict[int, Draft]) -> tuple[int, ...]:
        """The residual streams the forward should keep: those drafters ask for at their sequences'
        draft rows and at the prompt rows they read."""
        layers = {k for i in drafts for k in self.drafter(work[i].seq.spec).layers_wanted(work[i].seq.view)}
        layers |= {k for w in work if w.chunk for k in self.drafter(w.seq.spec).prefill_layers}
        return tuple(sorted(layers))

    def _depth(self, w: Work) -> int:
        """How deep w's sequence may draft, before the goodput policy: its DraftLength (a drafter that
        plans its own length is offered the most), within the room the pool and context leave it."""
        seq = w.seq
        seq.room = min(self.config.max_draft_rows, self.context_length - seq.cached - w.chunk)
        drafter = self.drafter(seq.spec)
        want = 0 if w.chunk and drafter.writes_target_kv else seq.length.value
        if want and drafter.plans_length:
            want = seq.spec.max_draft
        return max(min(want, seq.room - 1), 0)

    def _checks(self, work: list[Work], decoding: list[int], depth: dict[int, int]) -> set[int]:
        """The sequences whose drafts the goodput policy checks whole this step: the first drafting
        sequence of each SpecConfig whose check is due."""
        first: dict[SpecConfig, int] = {}
        for i in decoding:
            if work[i].seq.spec.goodput and depth[i]:
                first.setdefault(work[i].seq.spec, i)
        return {first[spec] for spec in self.goodput.due_checks(first)}

    def _plan_depths(self, work: list[Work], decoding: list[int], depth: dict[int, int], checked: set[int]) -> None:
        """Before drafting, the goodput policy sets the depth of drafters that pay a forward per drafted
        token, and spares the others drafting where not even one node would pay."""
        planned = [i for i in decoding if work[i].seq.spec.goodput and depth[i]]
        if not planned:
            return
        sure_rows = sum(w.chunk + w.decode for w in work)
        chains = [Drafting(spec=work[i].seq.spec, ratio=work[i].seq.accepted_ratio, depth=depth[i],
                           checked=i in checked, last_draft=work[i].seq.last_draft,
                           keyed=self.drafter(work[i].seq.spec).keyed) for i in planned]
        for i, d in zip(planned, self.goodput.depths(chains, sure_rows, float(len(decoding)))):
            if d == 0 or self.drafter(work[i].seq.spec).drafts_with_model:
                depth[i] = d

    def _draft(self, work: list[Work], decoding: list[int], depth: dict[int, int]) -> dict[int, Draft]:
        """Each drafter drafts for all its sequences with a depth at once (propose_batch); a sequence
        with none, or whose drafter writes target K/V the pool has no room for, verifies its root
        alone. A batch's drafting time is shared evenly by its sequences' stats."""
        drafts, batches = {}, {}
        for i in decoding:
            seq = work[i].seq
            self.begin(seq)
            d = depth[i]
            if d and self.drafter(seq.spec).writes_target_kv and not self.pool.reserve(seq, seq.cached + d + 1):
                d = 0
            if d:
                batches.setdefault(seq.spec, []).append(i)
            else:
                drafts[i] = root_only(seq.view)
        for spec, batch in batches.items():
            start = time.perf_counter()
            proposed = self.drafter(spec).propose_batch([work[i].seq.view for i in batch], [depth[i] for i in batch])
            share = (time.perf_counter() - start) / len(batch)
            for i, draft in zip(batch, proposed):
                drafts[i] = draft
                work[i].seq.stats.draft_s += share
        return {i: drafts[i] for i in decoding}  # in work order, as the forward packs them

    def _cut(self, work: list[Work], drafts: dict[int, Draft], checked: set[int]) -> None:
        """The goodput policy's cut of every draft of a goodput SpecConfig, across the batch."""
        policed = [i for i in drafts if work[i].seq.spec.goodput]
        if not policed:
            return
        sure_rows = sum(w.chunk for w in work) + len(policed)
        sure_rows += sum(d.rows for i, d in drafts.items() if i not in policed)
        entries = []
        for i in policed:
            seq, draft = work[i].seq, drafts[i]
            entries.append(Entry(draft, self.goodput.memory(seq.spec), seq.accepted_ratio,
                                 cuttable=seq.params.greedy or draft.q is None, checked=i in checked,
                                 context=(draft.key, seq.last_draft)))
        for i, cut in zip(policed, self.goodput.cut(entries, sure_rows, float(len(drafts)))):
            drafts[i] = cut

    # -- after the forward ----------------------------------------------------------------------------

    def observe_prefill(self, work: list[Work], batch: ForwardBatch, out: ForwardOutput) -> None:
        """Hand each drafter that asks for them (Drafter.prefill_layers) the residual streams at the
        prompt (or recomputed) rows its sequences computed this step; a drafter sees them before its
        sequence's first draft, so it is begun here if it has not been."""
        for i, w in enumerate(work):
            drafter = self.drafter(w.seq.spec)
            if not w.chunk or not drafter.prefill_layers:
                continue
            seq = w.seq
            self.begin(seq)
            first = int(batch.row_start[i])
            rows = slice(first, first + w.chunk)
            drafter.observe_prefill(seq.view, seq.cached, {k: out.layers[k][rows] for k in drafter.prefill_layers})

    def verify(self, work: list[Work], drafts: dict[int, Draft], batch: ForwardBatch, out: ForwardOutput
               ) -> tuple[dict[int, Verdict], dict[int, Scores]]:
        """Every draft's verdict (verified together, forerun.verify.verify_batch) and the target's
        outputs at its rows. out.logits holds the decoding sequences' draft rows in work order."""
        order = list(drafts)
        seqs = [work[i].seq for i in order]
        raw = _process(seqs, [drafts[i] for i in order], out.logits)
        verdicts = verify_batch([drafts[i] for i in order], out.logits, [s.params for s in seqs],
                                [s.generator for s in seqs])
        scores, row = {}, 0  # row: into out.logits
        for b, i in enumerate(order):
            draft = drafts[i]
            first = int(batch.row_start[i]) + work[i].chunk
            rows = slice(first, first + draft.rows)
            scores[i] = Scores(logits=raw.get(b, out.logits[row:row + draft.rows]), hidden=out.hidden[rows],
                               layers={k: v[rows] for k, v in out.layers.items()})
            row += draft.rows
        return dict(zip(order, verdicts)), scores

    def observe(self, seq: Sequence, draft: Draft, verdict: Verdict, scores: Scores) -> None:
        """After seq committed its verdict: its drafter's feedback, and the goodput policy's odds."""
        self.drafter(seq.spec).observe(seq.view, draft, verdict, scores)
        draft, verdict = drafted_part(draft, verdict)  # the policy's odds are of the drafter's trees
        if seq.spec.goodput and draft.size > 1:
            expected = self.goodput.learn(seq.spec, draft, verdict, (draft.key, seq.last_draft))
            # recent drafts weigh most: acceptance comes in runs (a copied passage, a list)
            seq.draft_expected = RATIO_DECAY * seq.draft_expected + expected
            seq.draft_accepted = RATIO_DECAY * seq.draft_accepted + verdict.accepted
        seq.last_draft = _outcome(draft, verdict)

    def record(self, work: list[Work], drafts: dict[int, Draft], verdicts: dict[int, Verdict], rows: int,
               seconds: float) -> None:
        """After the step (`rows` in its forward, `seconds` from schedule to commit): each decoding
        sequence's draft length learns from its share of the time, the goodput policy from the whole.
        A step that also computed a prompt chunk measures no drafting."""
        prefilling = any(w.chunk for w in work)
        for i, draft in drafts.items():
            verdict = verdicts[i]
            share = None if work[i].chunk else seconds * draft.rows / rows  # a prefill's time is not drafting's
            own, own_verdict = drafted_part(draft, verdict)
            work[i].seq.length.update(max(own.tree.depths), own_verdict.accepted, share, verdict.accepted + 1)
        if not prefilling:  # a prompt chunk's rows cost unlike decoding rows
            self.goodput.record(rows, seconds)


def _cut_to_grammar(work: list[Work], drafts: dict[int, Draft]) -> None:
    """Drop the draft nodes a sequence's grammar rules out, with their subtrees: the target's masked
    distribution gives them no mass, so they would be rejected anyway. Only where dropping them
    changes nothing else: under greedy verification, or from a deterministic draft (a point mass the
    target rules out leaves its residual as it was). A sampled sibling's rejection reshapes the
    residual the next sibling meets, so a sampled draft keeps its nodes."""
    for i, draft in drafts.items():
        seq = work[i].seq
        grammar = seq.processors.grammar if seq.processors is not None else None
        if grammar is None or draft.size == 1 or not (seq.params.greedy or draft.q is None):
            continue
        keep = grammar.reachable(draft.tree)
        if len(keep) < draft.size:
            drafts[i] = keep_nodes(draft, keep)
            grammar.keep(draft.tree, drafts[i].tree, keep)


def _add_forced(work: list[Work], drafts: dict[int, Draft]) -> None:
    """Hang below the deepest node of each grammar sequence's draft the tokens its grammar forces
    there (SGLang's jump-forward, llguidance's fast-forward tokens), as far as its room allows. They
    are drafts like any other: verified, so the output is unchanged; the grammar allows no other
    bytes there (only, at times, another tokenization of them), so the masked target accepts them
    almost wherever it accepts their path. Deterministic drafts without extra nodes only (a sampled
    draft's q has no rows for them; extra nodes' masks no columns)."""
    for i, draft in drafts.items():
        seq = work[i].seq
        grammar = seq.processors.grammar if seq.processors is not None else None
        if grammar is None or not seq.spec.forced_tokens or draft.q is not None or draft.extra is not None:
            continue
        depths = draft.tree.depths
        leaf = depths.index(max(depths))
        chain = grammar.forced(draft.tree, leaf, seq.room - draft.rows)
        if chain:
            drafts[i] = Draft(draft.tree.grown(leaf, chain), key=draft.key, forced=len(chain))


def drafted_part(draft: Draft, verdict: Verdict) -> tuple[Draft, Verdict]:
    """The draft without its forced chain, and the verdict on that part: what the drafter drafted and
    how it went, for its adaptive length and the goodput policy's odds."""
    if not draft.forced:
        return draft, verdict
    own = draft.size - draft.forced
    return keep_nodes(draft, list(range(own))), Verdict([n for n in verdict.path if n < own], verdict.next_token)


def _process(seqs: list[Sequence], drafts: list[Draft], logits: Tensor) -> dict[int, Tensor]:
    """Run each sequence's processors (forerun.logits_process) on its tree rows of logits [R, V], in
    place, before verification; returns the model's own rows (tree and extra) of each sequence processed,
    by its place in seqs, for the drafter's observe() and for logprobs. Other sequences are not touched."""
    raw, row = {}, 0
    for b, (seq, draft) in enumerate(zip(seqs, drafts)):
        if seq.processors is not None:
            raw[b] = logits[row:row + draft.rows].clone()
            tree_rows = logits[row:row + draft.size]
            processed = seq.processors.apply(tree_rows, draft.tree)
            if processed is not tree_rows:
                tree_rows.copy_(processed)
        row += draft.rows
    return raw


def _outcome(draft: Draft, verdict: Verdict) -> str:
    """How a step's draft went, for the next step's odds: "plain" (no draft), "all" (its deepest
    path accepted), "some" or "none"."""
    if draft.size == 1:
        return "plain"
    if verdict.accepted == 0:
        return "none"
    return "all" if verdict.accepted == max(draft.tree.depths) else "some"


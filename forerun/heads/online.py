"""Online adaptation of an EAGLE-3 head to the text it drafts for (`--learn`), after online speculative
decoding (Liu et al. 2023, "Online Speculative Decoding", arXiv 2310.07177).

Every verification step already hands the drafter what offline training records (forerun.heads.data):
the target's three residual streams at the accepted positions, its final hidden state there and its
choice. The drafter passes those rows on here, per sequence; every `chunk` rows (and when the sequence
ends) they become one training example, with up to `context` earlier rows before them as keys only,
kept in a window of the most recent `window` examples. A training step takes the newest example and
others drawn from the window (about `batch_rows` rows), unrolls the head over them for `unroll`
drafting steps, and takes one AdamW step on the cross-entropy against the target's distribution over
the draft vocabulary, as forerun.heads.train does. Every labelled row served buys `passes` rows of
training, which bounds the learner's share of the CPU. The loss counts the positions the head got wrong
when it drafted: positions whose token was an accepted draft are masked, as OSD trains on the mismatches only
(the head already knows those; training on them again mostly pulls it towards what it has seen most).

The decoder layer and the final norm learn; `fc` too with `fc=True`, on features divided by their RMS
per dimension (measured on the first rows served), as offline training does, since the target's raw
residual streams differ in scale by four orders of magnitude between dimensions; the scale is folded
back into the weights the drafter takes. The embedding is the target's and `lm_head` its own rows.

The learner trains on its own copy of the head, in a background thread (or in the caller's, with
`background=False`, as the tests do), and every `publish_every` steps offers the copy's weights; the
drafter takes them between steps (`take`) and repacks its inference weights. Drafts change, outputs
never: every draft is verified by the target as before.
"""
from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from forerun.heads.eagle3 import Eagle3Head
from forerun.heads.train import Example, collate, feature_scale, losses

LEARNED = ("input_layernorm", "hidden_norm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm",
           "gate_proj", "up_proj", "down_proj", "norm")


@dataclass(frozen=True, slots=True)
class LearnConfig:
    lr: float = 3e-4
    unroll: int = 2  # drafting steps per row (training-time test)
    batch_rows: int = 512  # rows a training step takes at most
    chunk: int = 64  # a sequence's rows become an example every this many
    context: int = 96  # earlier rows kept before an example's, as keys only
    publish_every: int = 4  # training steps between the weights offered to the drafter
    fc: bool = False  # train fc too (on features divided by their RMS, measured on the first rows served)
    window: int = 128  # the most recent examples kept to train on (about 0.7 MB each for the embedded model)
    passes: float = 4.0  # each new row buys this many rows of training (drawn from the window): what bounds
    # the learner's share of the CPU


@dataclass(eq=False)
class Record:
    """One sequence's rows since its last example (and the context before them). Row i holds the
    target's features at position i, the token x_{i+1}, the target's final hidden state at position i
    (zeros where not known: prompt rows), its choice after position i (-1: not known), and whether
    x_{i+1} was a draft token the target accepted."""

    features: list[torch.Tensor] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    choice: list[torch.Tensor] = field(default_factory=list)
    drafted: list[torch.Tensor] = field(default_factory=list)
    context: int = 0  # leading rows that are context only (an earlier example's)

    def rows(self) -> int:
        return sum(len(t) for t in self.tokens)

    def cut_from(self, position: int) -> None:
        """Drop the rows at `position` and later (the drafter recomputed them)."""
        for i, p in enumerate(self.positions):
            keep = p < position
            if not bool(keep.all()):
                for name in ("features", "tokens", "positions", "hidden", "choice", "drafted"):
                    rows = getattr(self, name)
                    rows[i] = rows[i][keep[:len(rows[i])]]
                    del rows[i + 1:]
                return


class OnlineLearner:
    def __init__(self, head: Eagle3Head, target_rows: torch.Tensor, config: LearnConfig = LearnConfig(),
                 background: bool = True):
        """target_rows: the target's output rows for the head's draft vocabulary (train.target_rows)."""
        self.config = config
        self.model = head.unpacked_copy()  # trained here; the drafter's head is only overwritten by take()
        self.model.float()
        self.learned = LEARNED + (("fc",) if config.fc else ())
        self.scale: torch.Tensor | None = None  # with fc: the features' RMS, folded into the copy's fc
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.split(".")[0] in self.learned)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.target_rows = target_rows.float()
        draft_of = torch.full((self.model.t2d.shape[0],), -1, dtype=torch.long)
        draft_of[self.model.t2d.nonzero()[:, 0]] = torch.arange(int(self.model.t2d.sum()))
        self.draft_of = draft_of
        self.window: deque[Example] = deque(maxlen=config.window)
        self.budget = 0.0  # rows of training the new rows have bought and not yet spent
        self.rng = random.Random(0)
        self.steps = self.positions = 0
        self.losses: list[float] = []
        self._offer: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()  # the window, the budget and the offer
        self._training = threading.RLock()
        self._stop = threading.Event()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="forerun-learn", daemon=True)
            self._thread.start()

    # -- rows from the drafter -------------------------------------------------------------------------

    def add(self, record: Record, features: torch.Tensor, tokens: list[int], first: int,
            hidden: torch.Tensor | None = None, choice: torch.Tensor | None = None,
            drafted: torch.Tensor | None = None) -> None:
        """Rows at positions first.. (prompt rows: no hidden, choice or drafted); rows the record holds
        at those positions or later give way, as the drafter's own do."""
        n = len(tokens)
        record.cut_from(first)
        record.features.append(features.detach().to(torch.float16))
        record.tokens.append(torch.tensor(tokens, dtype=torch.long))
        record.positions.append(torch.arange(first, first + n))
        record.hidden.append(torch.zeros(n, self.model.config.hidden_size, dtype=torch.float16) if hidden is None
                             else hidden.detach().to(torch.float16))
        record.choice.append(torch.full((n,), -1, dtype=torch.long) if choice is None else choice.long())
        record.drafted.append(torch.zeros(n, dtype=torch.bool) if drafted is None else drafted.bool())
        if record.rows() - record.context >= self.config.chunk:
            self.flush(record, keep=True)

    def flush(self, record: Record, keep: bool = False) -> None:
        """The record's new rows become an example; with `keep`, its last `context` rows stay as the
        next example's context."""
        cat = {name: torch.cat(getattr(record, name)) for name in
               ("features", "tokens", "positions", "hidden", "choice", "drafted")} if record.tokens else None
        if cat is not None and len(cat["tokens"]) - record.context >= 2:
            self._keep(cat, record.context)
        for name in ("features", "tokens", "positions", "hidden", "choice", "drafted"):
            rows = getattr(record, name)
            kept = [cat[name][-self.config.context:]] if keep and cat is not None else []
            rows[:] = kept
        # the last row kept had no label yet (its successor was not there): the next example labels it
        record.context = max(record.rows() - 1, 0)

    def _keep(self, rows: dict[str, torch.Tensor], context: int) -> None:
        # row i is scored against the target's choice after position i + 1, found at row i + 1: its hidden
        # state there and the draft id of its choice, unless row i + 1's token was an accepted draft (the
        # head had it right) or the choice lies outside the draft vocabulary
        n = len(rows["tokens"])
        label = torch.full((n,), -1, dtype=torch.long)
        hidden = torch.zeros_like(rows["hidden"])
        hidden[:-1] = rows["hidden"][1:]
        known = rows["choice"][1:] >= 0
        label[:-1][known] = self.draft_of[rows["choice"][1:][known]]
        label[:-1][rows["drafted"][1:]] = -1
        label[:context] = -1
        if not bool((label >= 0).any()):
            return
        example = Example(rows["features"][:-1], rows["tokens"][:-1], rows["positions"][:-1], hidden[:-1], label[:-1])
        with self._lock:
            self.window.append(example)
            self.budget += self.config.passes * int((label >= 0).sum())

    # -- training --------------------------------------------------------------------------------------

    def step(self) -> bool:
        """One training step on examples drawn from the window (about batch_rows rows, the newest
        always among them), if the rows served have bought one; False if not. One at a time: the
        background thread and a caller may both ask."""
        with self._training:
            return self._step()

    def _step(self) -> bool:
        with self._lock:
            if self.budget <= 0 or not self.window:
                return False
            pool = list(self.window)
        taken, rows = [pool[-1]], len(pool[-1].tokens)
        for example in self.rng.sample(pool[:-1], len(pool) - 1):
            if rows + len(example.tokens) > self.config.batch_rows:
                break
            taken.append(example)
            rows += len(example.tokens)
        if self.config.fc and self.scale is None:  # as offline training does: fc learns on scaled features
            self.scale = feature_scale(pool)
            with torch.no_grad():
                self.model.fc.weight.mul_(self.scale)
        unroll = self.config.unroll
        batch = collate(taken, unroll, self.scale)
        loss, _, counted = losses(self.model, self.target_rows, batch, unroll)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.losses.append(loss.item())
        self.positions += int(counted[0])
        with self._lock:
            self.budget -= int(counted[0])
        self.steps += 1
        if self.steps % self.config.publish_every == 0:
            self.publish()
        return True

    def publish(self) -> None:
        """Offer the copy's learned weights to the drafter."""
        with self._training:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                     if k.split(".")[0] in self.learned}
        if self.scale is not None:
            state["fc.weight"] = state["fc.weight"] / self.scale  # the drafter's fc reads raw features
        with self._lock:
            self._offer = state

    def take(self) -> dict[str, torch.Tensor] | None:
        """The newest weights offered since the last take(), or None."""
        with self._lock:
            state, self._offer = self._offer, None
        return state

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.step():
                self._stop.wait(0.05)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


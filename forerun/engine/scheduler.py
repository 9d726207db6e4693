"""Which sequences a step runs, and how much of each.

Running sequences come first, oldest first: each feeds its pending tokens (a prompt being
prefilled, or everything of a preempted sequence being recomputed) in chunks under the step's token
budget, and once only its root is pending it decodes: root plus draft. Decoding rows are never held
back by the budget, so a long prompt cannot stall the others; it is cut into chunks instead.
Waiting sequences are admitted in arrival order while there is room: a free running place, budget
left, and KV blocks for their first chunk after taking what the prefix cache already holds, with
a block to spare for every running sequence's growth.

When a running sequence needs a block and none is left, the newest running sequence is preempted:
its blocks go back to the pool (the full ones stay in the prefix cache until evicted) and it
waits at the head of the queue, to be recomputed from its tokens. Every kernel computes a row the
same way in any batch (forerun.kernels), so a recomputed sequence continues exactly as it would have.
"""
from __future__ import annotations

import time

from collections import deque
from dataclasses import dataclass

from forerun.config import EngineConfig
from forerun.engine.kv_pool import KVPool
from forerun.engine.sequence import SCORE_CHUNK, Sequence, Status


@dataclass(slots=True)
class Work:
    """One sequence's share of a step."""

    seq: Sequence
    chunk: int  # pending tokens before the root that this step computes
    decode: bool  # and then its root and draft, verified


class Scheduler:
    def __init__(self, pool: KVPool, config: EngineConfig):
        self.pool = pool
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take seq out of its queue and give back its blocks (it finished or was aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free_sequence(seq)

    def schedule(self, may_decode) -> list[Work]:
        """This step's work; may_decode(seq) says whether seq may verify its root this step (a
        request of several samples forks first)."""
        budget = self.config.max_step_tokens
        work: list[Work] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted by an older sequence below
                continue
            w = self._fit(seq, budget, may_decode(seq))
            while not self.pool.reserve(seq, seq.cached + w.chunk + w.decode):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                if w.chunk or w.decode:
                    work.append(w)
                    budget -= w.chunk + w.decode
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            decodes = may_decode(seq)
            seats = 1 if decodes else seq.params.samples  # a request of n samples (or best_of) forks into as many
            if len(self.running) + seats > self.config.max_num_seqs:
                break
            found = self.pool.match_prefix(seq)
            w = self._fit(seq, budget, decodes)
            spare = len(self.running) + 1  # a block for each running sequence to grow into
            if self.pool.available < self._blocks_needed(seq, w) + spare or \
                    not self.pool.reserve(seq, seq.cached + w.chunk + w.decode):
                self.pool.free_sequence(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if not (seq.stats.prefill_tokens or seq.stats.target_forwards):  # first admission
                seq.stats.cached_tokens = found
                seq.stats.queue_s = time.perf_counter() - seq.arrival
            self.running.append(seq)
            if w.chunk or w.decode:  # else a prompt found whole in the prefix cache, to fork first
                work.append(w)
                budget -= w.chunk + w.decode
        return work

    def _fit(self, seq: Sequence, budget: int, may_decode: bool) -> Work:
        before_root = seq.pending - 1
        if seq.scoring is not None:
            budget = min(budget, SCORE_CHUNK)
        if may_decode and before_root <= budget:
            return Work(seq, before_root, True)
        return Work(seq, min(before_root, max(budget, 0)), False)

    def _blocks_needed(self, seq: Sequence, w: Work) -> int:
        return max(self.pool.blocks_for(seq.cached + w.chunk + w.decode) - len(seq.blocks), 0)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free_sequence(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

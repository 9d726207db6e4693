"""The shared KV pool: fixed-size blocks of slots in one store, owned by sequences through block lists.

Why blocks of slots rather than one contiguous range per sequence: sequences come and go in any
order, and a fixed block size leaves no holes to compact; a block is also the unit that two
sequences can share. Sharing takes three forms:

- fork: n sequences continue from one parent; they hold the parent's blocks with reference counts,
  and a child copies only the partly filled last block before it first writes into it;
- prefix caching: every block filled with committed tokens is registered under its content (its
  tokens and everything before them). A new request whose prompt starts with registered blocks
  takes them and prefills only the rest; so does a preempted sequence when it comes back;
- blocks whose last reference is gone stay registered and are evicted least recently used first,
  only when a block is needed and none is free.

A block's content is identified exactly by (content id of the previous block, its tokens), with ids
handed out once and never reused, so two different prefixes can never share a block.

The KV of a token depends only on the tokens up to it: on the CPU kernels every row's arithmetic is
independent of the batch (forerun.kernels), so a shared or recomputed block holds exactly what the
sequence would have computed itself.
"""
from __future__ import annotations

from collections import OrderedDict, deque

import torch

from forerun.cache import KVCache
from forerun.engine.sequence import Sequence


class PoolExhausted(RuntimeError):
    """No free or evictable block is left."""


class PoolBusy(ValueError):
    """Work the pool could hold, but not while the sequences in flight (or handed out by
    Engine.prefilled) hold their blocks: worth retrying later."""


class KVPool:
    def __init__(self, store: KVCache, block_size: int = 16, caching: bool = True):
        if block_size < 1 or store.slots < block_size:
            raise ValueError(f"a pool of {store.slots} slots cannot hold blocks of {block_size}")
        self.store = store
        self.block_size = block_size
        self.caching = caching  # the prefix cache: off, blocks are only ever shared by forks
        self.num_blocks = store.slots // block_size
        self.refs = [0] * self.num_blocks
        # Unreferenced and unregistered: blocks given back first (their memory is warm), then those
        # never used, in order, so the pool touches a new block's pages only when it needs one more.
        self.free: deque[int] = deque(range(self.num_blocks))
        self.touched = 0  # blocks ever handed out (0 .. touched - 1): the pool's resident share
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, registered; oldest first
        self.content_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> its content key
        self.block_of: dict[tuple[int, tuple[int, ...]], int] = {}  # content key -> block
        self.id_of: dict[tuple[int, tuple[int, ...]], int] = {}  # content key -> content id
        self._next_id = 1  # content id 0 is "nothing before": the key of a sequence's first block
        self.queried_blocks = 0  # prefix-cache lookups, in blocks
        self.hit_blocks = 0

    # -- accounting -------------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free, or unreferenced and evictable)."""
        return len(self.free) + len(self.evictable)

    @property
    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.available

    @property
    def touched_bytes(self) -> int:
        """Memory of the blocks ever used: resident from their first use on."""
        return self.touched * self.block_size * self.store.bytes_per_slot

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.queried_blocks if self.queried_blocks else 0.0

    def blocks_for(self, slots: int) -> int:
        return -(-slots // self.block_size)

    # -- blocks ---------------------------------------------------------------------------------------

    def _take(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            self._unregister(block)
        else:
            raise PoolExhausted("the KV pool is full")
        self.refs[block] = 1
        self.touched = max(self.touched, block + 1)
        return block

    def _hold(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

    def _release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] > 0:
            return
        if block in self.content_of:
            self.evictable[block] = None  # most recently used last
        else:
            self.free.appendleft(block)

    def _unregister(self, block: int) -> None:
        key = self.content_of.pop(block)
        del self.block_of[key], self.id_of[key]

    # -- sequences ------------------------------------------------------------------------------------

    def reserve(self, seq: Sequence, slots: int) -> bool:
        """Make seq's blocks cover logical slots [0, slots) and own the block it writes next (logical
        slot seq.cached), copying it first if another sequence shares it. False, changing nothing
        that matters, if the pool cannot."""
        need = self.blocks_for(slots) - len(seq.blocks)
        first = seq.cached // self.block_size  # the block the next write goes into
        shared = first < len(seq.blocks) and self.refs[seq.blocks[first]] > 1
        if max(need, 0) + shared > self.available:
            return False
        if shared:
            self._copy_on_write(seq, first)
        for _ in range(need):
            seq.blocks.append(self._take())
        return True

    def _copy_on_write(self, seq: Sequence, i: int) -> None:
        old, new = seq.blocks[i], self._take()
        filled = seq.cached - i * self.block_size  # committed slots of the block; the rest is garbage
        if filled > 0:
            base = torch.arange(filled)
            self.store.copy(old * self.block_size + base, new * self.block_size + base)
        seq.blocks[i] = new
        self._release(old)

    def trim(self, seq: Sequence, slots: int) -> None:
        """Give back seq's blocks past logical slot `slots` (scratch rows of a rejected draft)."""
        keep = self.blocks_for(slots)
        while len(seq.blocks) > keep:
            self._release(seq.blocks.pop())

    def free_sequence(self, seq: Sequence) -> None:
        """Drop all of seq's blocks (finished, aborted or preempted); it caches nothing afterwards."""
        for block in seq.blocks:
            self._release(block)
        seq.blocks, seq.cached, seq.content_ids = [], 0, []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every block of parent (reference counts); nothing is copied now."""
        for block in parent.blocks:
            self._hold(block)
        child.blocks, child.cached, child.content_ids = list(parent.blocks), parent.cached, list(parent.content_ids)

    def commit(self, seq: Sequence, path: list[int]) -> None:
        """A verification wrote draft node i at logical slot seq.cached + i; keep the accepted nodes
        `path` (node indices in order, starting with the root 0) as slots seq.cached + j, copying only
        the nodes not already in place, then advance seq.cached past them."""
        moved = [(node, j) for j, node in enumerate(path) if node != j]
        if moved:
            src = seq.slots(seq.cached, seq.cached + max(node for node, _ in moved) + 1)
            dst = seq.slots(seq.cached, seq.cached + len(path))
            self.store.copy(src[[node for node, _ in moved]], dst[[j for _, j in moved]])
        seq.cached += len(path)

    # -- prefix cache ---------------------------------------------------------------------------------

    def _key(self, parent_id: int, tokens: list[int]) -> tuple[int, tuple[int, ...]]:
        return parent_id, tuple(tokens)

    def match_prefix(self, seq: Sequence) -> int:
        """Take the registered blocks that hold a prefix of seq's reusable tokens (all but its root,
        which the next step computes, or a scored sequence's unscored rows), and mark them cached. seq
        must hold no blocks. Returns the tokens found."""
        assert not seq.blocks, "match_prefix needs a sequence without blocks"
        usable = seq.reusable // self.block_size if self.caching else 0
        self.queried_blocks += usable
        parent = 0
        for i in range(usable):
            key = self._key(parent, seq.tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.block_of.get(key)
            if block is None:
                break
            self._hold(block)
            seq.blocks.append(block)
            parent = self.id_of[key]
            seq.content_ids.append(parent)
        self.hit_blocks += len(seq.blocks)
        seq.cached = len(seq.blocks) * self.block_size
        return seq.cached

    def clear_cache(self) -> int:
        """Forget every registered block no sequence holds (they become free); returns how many."""
        cleared = len(self.evictable)
        while self.evictable:
            block, _ = self.evictable.popitem(last=False)
            self._unregister(block)
            self.free.append(block)
        return cleared

    def register(self, seq: Sequence) -> None:
        """Register seq's newly filled blocks (all their slots committed) under their content. A
        content already registered under another block keeps that block; seq's copy stays private."""
        while self.caching and len(seq.content_ids) < seq.cached // self.block_size:
            i = len(seq.content_ids)
            key = self._key(seq.content_ids[-1] if seq.content_ids else 0,
                            seq.tokens[i * self.block_size:(i + 1) * self.block_size])
            if key not in self.block_of:
                self.block_of[key], self.content_of[seq.blocks[i]] = seq.blocks[i], key
                self.id_of[key] = self._next_id
                self._next_id += 1
            seq.content_ids.append(self.id_of[key])

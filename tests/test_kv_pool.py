"""The shared KV pool: blocks with reference counts, copy-on-write after a fork, commits that copy only
the accepted rows, the prefix cache with least-recently-used eviction, and preemption under a pool too
small for the batch, which must change no output and leak no block."""
import pytest
import torch

from conftest import tiny_runtime
from forerun import LLM, SamplingParams, SpecConfig
from forerun.cache import KVCache
from forerun.config import EngineConfig
from forerun.engine.kv_pool import KVPool
from forerun.engine.sequence import Sequence

pytestmark = pytest.mark.usefixtures("single_thread")

B = 4  # block size of the unit tests' pool


def pool_of(blocks: int) -> KVPool:
    store = KVCache(num_layers=2, num_kv_heads=1, head_dim=2, slots=blocks * B, dtype=torch.float32)
    store.k.copy_(torch.arange(store.k.numel(), dtype=torch.float32).view(store.k.shape))
    store.v.copy_(-store.k)
    return KVPool(store, block_size=B)


def sequence(tokens: list[int]) -> Sequence:
    return Sequence(tokens=list(tokens), prompt_len=len(tokens), params=SamplingParams(), block_size=B)


def fill(pool: KVPool, seq: Sequence, upto: int) -> None:
    """Reserve and mark logical slots [0, upto) computed (as a prompt chunk would)."""
    assert pool.reserve(seq, upto)
    seq.cached = upto
    pool.register(seq)


def test_blocks_are_counted_and_given_back():
    pool = pool_of(6)
    a = sequence(list(range(10)))
    fill(pool, a, 9)
    assert len(a.blocks) == 3 and pool.used == 3 and pool.available == 3
    assert a.slots(0, 9).tolist() == [a.blocks[i // B] * B + i % B for i in range(9)]
    b = sequence(list(range(100, 113)))
    assert not pool.reserve(b, 13)  # 4 blocks needed, 3 left: nothing taken
    assert b.blocks == [] and pool.used == 3
    pool.free_sequence(a)
    assert pool.used == 0 and a.blocks == [] and a.cached == 0
    assert pool.available == 6  # two of a's blocks are registered, evictable, still counted as available
    assert pool.reserve(b, 13) and pool.used == 4


def test_blocks_given_back_are_reused_before_untouched_ones():
    """A block's pages become resident when it is first written: reusing warm blocks first keeps the
    process's memory at what the load needs, and `touched` says how much of the pool that is."""
    pool = KVPool(KVCache(num_layers=1, num_kv_heads=1, head_dim=2, slots=64 * B, dtype=torch.float32),
                  block_size=B, caching=False)
    for round_ in range(20):
        seqs = [sequence(list(range(100 * round_ + 10 * i, 100 * round_ + 10 * i + 7))) for i in range(3)]
        for seq in seqs:
            assert pool.reserve(seq, 7)  # 2 blocks each
        for seq in seqs:
            pool.free_sequence(seq)
    assert pool.touched == 6 and pool.used == 0


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    pool = pool_of(8)
    parent = sequence(list(range(7)))
    fill(pool, parent, 6)  # one full block, one holding 2 committed slots
    children = [sequence(parent.tokens) for _ in range(2)]
    for child in children:
        pool.fork(parent, child)
    assert [pool.refs[b] for b in parent.blocks] == [3, 3]
    partial = parent.blocks[1]
    committed = pool.store.k[:, :, partial * B:partial * B + 2].clone()
    assert pool.reserve(children[0], 8)  # writes from slot 6: the shared partial block is copied first
    new = children[0].blocks[1]
    assert new != partial and children[0].blocks[0] == parent.blocks[0]
    assert torch.equal(pool.store.k[:, :, new * B:new * B + 2], committed)  # only what was committed
    assert [pool.refs[b] for b in parent.blocks] == [3, 2]
    for seq in (parent, *children):
        pool.free_sequence(seq)
    assert pool.used == 0


def test_commit_copies_only_accepted_nodes_out_of_place():
    pool = pool_of(8)
    seq = sequence(list(range(6)))
    fill(pool, seq, 5)
    assert pool.reserve(seq, 5 + 6)  # a tree of 6 nodes at logical slots 5..10
    slots = seq.slots(0, 11)
    before = pool.store.k.clone()
    pool.commit(seq, [0, 2, 5])  # root stays, node 2 -> slot 6, node 5 -> slot 7
    assert seq.cached == 8
    assert torch.equal(pool.store.k[:, :, slots[6]], before[:, :, slots[7]])
    assert torch.equal(pool.store.k[:, :, slots[7]], before[:, :, slots[10]])
    untouched = [i for i in range(pool.store.slots) if i not in (slots[6], slots[7])]
    assert torch.equal(pool.store.k[:, :, untouched], before[:, :, untouched])
    pool.commit(seq, [0, 1])  # a prefix path: nothing moves
    assert torch.equal(pool.store.k[:, :, untouched], before[:, :, untouched]) and seq.cached == 10
    pool.trim(seq, seq.cached)
    assert len(seq.blocks) == 3


def test_prefix_cache_matches_whole_blocks_and_evicts_least_recently_used():
    pool = pool_of(6)
    a = sequence(list(range(13)))
    fill(pool, a, 12)
    pool.free_sequence(a)  # three registered blocks, unreferenced
    b = sequence(list(range(9)) + [99, 98, 97, 96, 95])
    assert pool.match_prefix(b) == 8  # two blocks agree; the third holds other tokens
    assert [pool.refs[x] for x in b.blocks] == [1, 1]
    c = sequence(list(range(8)))  # its root (token 7) must stay uncached: one block of 4 usable
    assert pool.match_prefix(c) == 4
    for seq in (b, c):
        pool.free_sequence(seq)
    # fill the pool with something else: least recently used registered blocks go first (the third
    # block, then the second: the first was used last, by c)
    d = sequence(list(range(200, 224)))
    assert pool.reserve(d, 20)
    e = sequence(list(range(13)))
    assert pool.match_prefix(e) == 4
    assert pool.hit_rate > 0


def test_a_shared_prefix_is_computed_once_and_changes_nothing():
    system = list(range(3, 51))  # 48 tokens: three blocks of the default 16
    first, second = system + [7, 8, 9], system + [11, 12]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    llm = LLM(runtime=tiny_runtime("llama", seed=1))
    a = llm.generate_ids(first, params, SpecConfig(method="pld"))
    b = llm.generate_ids(second, params, SpecConfig(method="pld"))
    assert a.stats.cached_tokens == 0 and a.stats.prefill_tokens == len(first) - 1
    assert b.stats.cached_tokens == 48 and b.stats.prefill_tokens == len(second) - 1 - 48
    fresh = LLM(runtime=llm.runtime).generate_ids(second, params, SpecConfig(method="pld"))
    assert b.token_ids == fresh.token_ids
    # a next chat turn: the previous prompt and answer come back as a prefix
    turn = first + a.token_ids + [5, 6, 7]
    c = llm.generate_ids(turn, params, SpecConfig())
    assert c.stats.cached_tokens == (len(first) + len(a.token_ids)) // 16 * 16
    assert c.token_ids == LLM(runtime=llm.runtime).generate_ids(turn, params, SpecConfig()).token_ids


@pytest.mark.parametrize("method", ["ar", "pld", "layer-skip", "lookahead"])
def test_preemption_under_a_tiny_pool_changes_no_output_and_leaks_nothing(method):
    """Ten blocks of 16 slots for five requests that need four to six blocks each: sequences are
    preempted and recomputed (from the prefix cache where their blocks survived), some repeatedly."""
    target = tiny_runtime("llama", seed=1)
    prompts = [list(range(5, 40)), [7, 7, 7, 2] * 6, list(range(60, 20, -1)), [1, 5, 9, 13, 5, 9],
               list(range(3, 50, 2))]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (40, 60, 30, 50, 45)]
    spec = SpecConfig(method=method)
    roomy = LLM(runtime=target)
    alone = [roomy.generate_ids(p, q, spec).token_ids for p, q in zip(prompts, params)]
    tight = LLM(runtime=target, engine=EngineConfig(kv_cache_tokens=160, max_step_tokens=32, max_draft_rows=16))
    engine = tight.engine
    rids = [engine.add_request(p, q, spec) for p, q in zip(prompts, params)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.generations[0]
        assert engine.pool.used <= engine.pool.num_blocks
    assert [done[r].token_ids for r in rids] == alone
    assert engine.scheduler.preemptions > 0
    assert engine.pool.used == 0 and all(ref == 0 for ref in engine.pool.refs)
    recomputed = sum(done[r].stats.prefill_tokens for r in rids) - sum(len(p) - 1 for p in prompts)
    assert recomputed > 0  # preempted sequences computed some tokens again


def test_n_samples_hold_the_prompt_once_and_aborting_frees_every_block():
    llm = LLM(runtime=tiny_runtime("llama", seed=1))
    engine = llm.engine
    prompt = list(range(3, 40))  # 36 cached tokens: two full blocks and a partial one
    rid = engine.add_request(prompt, SamplingParams(n=3, temperature=1.0, seed=0, max_new_tokens=30, ignore_eos=True))
    while not engine.requests[rid].forked:
        engine.step()
    samples = engine.requests[rid].samples
    assert len(samples) == 3 and all(s.blocks[:2] == samples[0].blocks[:2] for s in samples)
    assert [engine.pool.refs[b] for b in samples[0].blocks[:2]] == [3, 3]
    engine.step()  # each sample writes its root: the shared partial block is copied for two of them
    assert len({s.blocks[2] for s in samples}) == 3
    assert [engine.pool.refs[b] for b in samples[0].blocks[:2]] == [3, 3]
    engine.abort(rid)
    assert engine.pool.used == 0 and not engine.has_unfinished()

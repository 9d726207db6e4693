"""Our Llama-family Transformer against the Hugging Face implementations, and the KV store, tree and
batch plumbing that speculative verification and batched decoding rely on.

Every architecture runs on a tiny random config with every weight randomised (HF initialises norms
to 1 and biases to 0, which would hide a missing norm or bias). The HF model is the reference for
full sequences; our own incremental, tree and commit paths must then reproduce those logits.
"""
from dataclasses import replace

import pytest
import torch

from forerun.cache import KVCache
from forerun.models.args import ModelArgs
from forerun.models.batch import ForwardBatch, Segment
from forerun.models.llama import Transformer
from forerun.tree import TreeShape

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

SEQ = [3, 17, 42, 8, 99, 0, 23, 57, 61, 5, 77, 31]  # 12 tokens: longer than the Mistral window
PARENTS = [-1, 0, 0, 1, 1, 2]  # root; two children; two grandchildren under 1, one under 2
SHAPE = TreeShape(PARENTS)
TREE_TOKENS = [11, 64, 9, 64, 2, 90]  # node 3 repeats node 1's token on purpose
PREFIX = 7  # tokens committed before the tree's root
FP32_ATOL = 1e-4

COMMON = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # wavelengths of a 16-dim head fall in all 3 bands
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),  # != hidden / heads = 16
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:  # keeps activations O(1): logits land at a few units, where softmax is sensitive
                p.copy_(noise / p.shape[-1] ** 0.5)


def build_pair(case: str, dtype: torch.dtype = torch.float32):
    config_name, arch, overrides = CASES[case]
    config = getattr(transformers, config_name)(**COMMON, **overrides)
    config.architectures = [arch]
    hf = getattr(transformers, arch)(config).eval()
    randomise(hf, seed=sorted(CASES).index(case))
    hf = hf.to(dtype)
    ours = Transformer(ModelArgs.from_hf_config(config.to_dict()), hf_weights(hf)).eval()
    return hf, ours


def hf_weights(hf) -> dict[str, torch.Tensor]:
    weights = dict(hf.state_dict())
    if hf.config.tie_word_embeddings:  # absent from tied checkpoints on disk, so the tie itself is tested
        del weights["lm_head.weight"]
    return weights


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
    return build_pair(request.param)


@torch.inference_mode()
def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    return hf(torch.tensor([tokens])).logits[0].float()  # [T, V]


@torch.inference_mode()
def run(model: Transformer, cache: KVCache, tokens: list[int], start: int, positions=None, mask=None) -> torch.Tensor:
    """One forward of `tokens` at slots [start, start + T) of a store where slot i holds position i."""
    positions = torch.arange(start, start + len(tokens)) if positions is None else positions
    return model(ForwardBatch.contiguous(torch.tensor(tokens), positions, start, mask), cache).logits


def full_forward(model: Transformer, tokens: list[int]) -> torch.Tensor:
    return run(model, model.new_cache(len(tokens)), tokens, 0)


def feed(model: Transformer, cache: KVCache, tokens: list[int], start: int = 0) -> torch.Tensor:
    """One token at a time at slots = positions start, start + 1, ...; returns [T, V] logits."""
    return torch.cat([run(model, cache, [t], start + i) for i, t in enumerate(tokens)])


def tree_forward(model: Transformer, cache: KVCache) -> torch.Tensor:
    """Commit SEQ[:PREFIX] to the cache, then run the whole tree rooted at slot PREFIX in one forward.
    The prefix goes in one token at a time, the path test_incremental_decoding checks on its own, so
    that a failure here is the tree's."""
    feed(model, cache, SEQ[:PREFIX])
    positions = PREFIX + torch.tensor(SHAPE.depths)
    return run(model, cache, TREE_TOKENS, PREFIX, positions, SHAPE.mask)


def root_path(node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = PARENTS[node]
    return path[::-1]


def test_full_sequence_matches_hf(pair):
    hf, ours = pair
    torch.testing.assert_close(full_forward(ours, SEQ), hf_logits(hf, SEQ), atol=FP32_ATOL, rtol=0)


def test_prompt_in_chunks_matches_hf(pair):
    """A prompt in two chunks (the second attends to the first through the store), then decoding."""
    hf, ours = pair
    cache = ours.new_cache(len(SEQ))
    logits = torch.cat([run(ours, cache, SEQ[:5], 0), run(ours, cache, SEQ[5:8], 5), feed(ours, cache, SEQ[8:], 8)])
    torch.testing.assert_close(logits, hf_logits(hf, SEQ), atol=FP32_ATOL, rtol=0)


def test_incremental_decoding_matches_hf(pair):
    """Prefill 3 tokens (within Mistral's window) in one forward, then one token per forward at
    explicit positions and slots, reaching past the window."""
    hf, ours = pair
    cache = ours.new_cache(len(SEQ))
    logits = torch.cat([run(ours, cache, SEQ[:3], 0), feed(ours, cache, SEQ[3:], start=3)])
    torch.testing.assert_close(logits, hf_logits(hf, SEQ), atol=FP32_ATOL, rtol=0)


@torch.inference_mode()
def test_ragged_batch_matches_hf_and_each_sequence_alone(pair):
    """Three sequences in one forward, their keys scattered over a shared store: one a prompt chunk
    after a cached prefix, one a single token, one a draft tree. Each row's logits match HF's, and
    equal bit for bit what the same sequence computes alone (every kernel treats rows independently)."""
    hf, ours = pair
    store = ours.new_cache(64)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    a, b, c = order[:12], order[12:24], order[24:40]  # each sequence's slots, by position
    run_rows = lambda segs: ours(ForwardBatch.pack(segs), store).logits  # noqa: E731
    for slots, n in ((a, 4), (b, 9), (c, PREFIX)):  # the cached prefixes, one token at a time
        for i in range(n):
            run_rows([Segment(torch.tensor([SEQ[i]]), torch.tensor([i]), slots[:i + 1])])
    segments = [
        Segment(torch.tensor(SEQ[4:10]), torch.arange(4, 10), a[:10]),
        Segment(torch.tensor([SEQ[9]]), torch.tensor([9]), b[:10]),
        Segment(torch.tensor(TREE_TOKENS), PREFIX + torch.tensor(SHAPE.depths), c[:PREFIX + len(PARENTS)],
                SHAPE.mask),
    ]
    together = run_rows(segments)
    alone = torch.cat([run_rows([s]) for s in segments])
    assert torch.equal(together, alone)
    torch.testing.assert_close(together[:6], hf_logits(hf, SEQ[:10])[4:10], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(together[6], hf_logits(hf, SEQ[:10])[9], atol=FP32_ATOL, rtol=0)
    for node in range(len(PARENTS)):
        expected = hf_logits(hf, SEQ[:PREFIX] + [TREE_TOKENS[i] for i in root_path(node)])[-1]
        torch.testing.assert_close(together[7 + node], expected, atol=FP32_ATOL, rtol=0, msg=f"tree node {node}")


def test_tree_forward_matches_sequential(pair):
    """Each node's logits equal a plain forward over prefix + the node's root-to-node path."""
    hf, ours = pair
    logits = tree_forward(ours, ours.new_cache(32))
    for node in range(len(PARENTS)):
        path_tokens = [TREE_TOKENS[i] for i in root_path(node)]
        expected = hf_logits(hf, SEQ[:PREFIX] + path_tokens)[-1]
        torch.testing.assert_close(logits[node], expected, atol=FP32_ATOL, rtol=0, msg=f"tree node {node}")


@pytest.mark.parametrize("path", [[0, 2, 5], [0, 1, 3], [0, 1], [0]], ids=str)
def test_commit_then_decode_matches_sequential(pair, path):
    """After committing an accepted path (its entries copied to the slots after the prefix), the
    next token sees exactly prefix + path."""
    hf, ours = pair
    cache = ours.new_cache(32)
    tree_forward(ours, cache)
    moved = [(node, j) for j, node in enumerate(path) if node != j]
    if moved:
        cache.copy(torch.tensor([PREFIX + n for n, _ in moved]), torch.tensor([PREFIX + j for _, j in moved]))
    nxt = 48
    logits = feed(ours, cache, [nxt], start=PREFIX + len(path))[0]
    expected = hf_logits(hf, SEQ[:PREFIX] + [TREE_TOKENS[i] for i in path] + [nxt])[-1]
    torch.testing.assert_close(logits, expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bfloat16_close_to_hf_bfloat16(case):
    """bf16 keeps 8 significant bits, so two correct bf16 implementations differ from the float32
    logits by rounding noise of the same size, not by zero. The principled bar is therefore relative
    to the reference's own bf16 error: our RMS deviation from the float32 logits may be at most twice
    HF's (summation order and fused projections change which roundings happen, not how many), and
    both must stay a small fraction of the logits' spread. A real bug (a missing norm, a wrong rope)
    moves logits by O(their spread), far above either bar."""
    hf32, _ = build_pair(case)
    hf16, ours16 = build_pair(case, torch.bfloat16)
    assert ours16.dtype == torch.bfloat16
    reference = hf_logits(hf32, SEQ)
    ours_err = (full_forward(ours16, SEQ) - reference).pow(2).mean().sqrt()
    hf_err = (hf_logits(hf16, SEQ) - reference).pow(2).mean().sqrt()
    spread = reference.std()
    assert hf_err < 0.05 * spread
    assert ours_err <= 2 * hf_err, f"ours {ours_err:.4f} vs HF {hf_err:.4f} RMS bf16 error"


def test_llama3_rope_scaling_is_applied():
    """Guards the llama3-rope case against passing vacuously: scaling must change the logits."""
    hf, scaled = build_pair("llama3-rope")
    assert scaled.args.rope_scaling is not None
    plain = Transformer(replace(scaled.args, rope_scaling=None), hf_weights(hf)).eval()
    assert not torch.allclose(full_forward(plain, SEQ), full_forward(scaled, SEQ), atol=1e-2)


# --- KVCache -----------------------------------------------------------------------------------

def test_store_copy_moves_every_layers_entries():
    cache = KVCache(num_layers=2, num_kv_heads=2, head_dim=3, slots=8, dtype=torch.float32)
    cache.k.copy_(torch.randn(cache.k.shape, generator=torch.Generator().manual_seed(0)))
    cache.v.copy_(torch.randn(cache.v.shape, generator=torch.Generator().manual_seed(1)))
    before_k, before_v = cache.k.clone(), cache.v.clone()
    cache.copy(torch.tensor([4, 7]), torch.tensor([3, 4]))
    assert torch.equal(cache.k[:, :, [3, 4]], before_k[:, :, [4, 7]])
    assert torch.equal(cache.v[:, :, [3, 4]], before_v[:, :, [4, 7]])
    untouched = [0, 1, 2, 5, 6, 7]
    assert torch.equal(cache.k[:, :, untouched], before_k[:, :, untouched])
    assert cache.bytes_per_slot == 2 * 2 * 2 * 3 * 4

"""The transformers adapter: models outside the native Llama family (here a random GPT-2) keep the
engine's contract: forwards of many sequences' rows (trees included) at explicit positions and store
slots, and loading from a Hugging Face directory with a clear warning that it is the slower path."""
import shutil

import pytest
import torch

from conftest import tiny_hf_runtime
from forerun import LLM, SamplingParams, SpecConfig
from forerun.models.batch import ForwardBatch, Segment
from forerun.tree import TreeShape

transformers = pytest.importorskip("transformers")

PARENTS = [-1, 0, 0, 1, 1, 2]
TREE = [11, 40, 9, 40, 2, 60]
PREFIX = [3, 17, 42, 8, 59, 0, 23]


@pytest.fixture(scope="module")
def adapter():
    return tiny_hf_runtime(seed=0).model


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.hf(torch.tensor([tokens])).logits[0].float()


def run(adapter, cache, tokens, start, positions=None, mask=None):
    positions = torch.arange(start, start + len(tokens)) if positions is None else positions
    with torch.inference_mode():
        return adapter(ForwardBatch.contiguous(torch.tensor(tokens), positions, start, mask), cache).logits


def test_prompt_then_steps_match_one_hf_forward(adapter):
    seq = PREFIX + [5, 6, 7]
    cache = adapter.new_cache(32)
    head = run(adapter, cache, seq[:4], 0)
    steps = [run(adapter, cache, [t], i) for i, t in enumerate(seq[4:], start=4)]
    # logits of a wide random GPT-2 reach |10|: float32 rounding of a step against one forward is ~1e-5 of that
    torch.testing.assert_close(torch.cat([head, *steps]), hf_logits(adapter, seq), atol=1e-4, rtol=1e-5)


def test_tree_nodes_match_their_paths_and_commit_keeps_the_path(adapter):
    cache = adapter.new_cache(32)
    run(adapter, cache, PREFIX, 0)
    shape = TreeShape(PARENTS)
    positions = len(PREFIX) + torch.tensor(shape.depths)
    tree = run(adapter, cache, TREE, len(PREFIX), positions, shape.mask)
    for node in range(len(PARENTS)):
        path, n = [], node
        while n >= 0:
            path.append(n)
            n = PARENTS[n]
        expected = hf_logits(adapter, PREFIX + [TREE[i] for i in reversed(path)])[-1]
        torch.testing.assert_close(tree[node], expected, atol=1e-4, rtol=1e-5)
    # accept root -> 2 -> 5 (moved to the slots after the prefix), then decode one more token
    p = len(PREFIX)
    cache.copy(torch.tensor([p + 2, p + 5]), torch.tensor([p + 1, p + 2]))
    step = run(adapter, cache, [30], p + 3)
    torch.testing.assert_close(step[0], hf_logits(adapter, PREFIX + [11, 9, 60, 30])[-1], atol=1e-4, rtol=1e-5)


def test_sequences_of_one_forward_match_each_alone(adapter):
    """Two sequences in one forward, keys scattered over one store: each gets what it gets alone."""
    store = adapter.new_cache(64)
    a, b = torch.arange(40, 50), torch.arange(5, 15)
    with torch.inference_mode():
        adapter(ForwardBatch.pack([Segment(torch.tensor(PREFIX), torch.arange(7), a[:7])]), store)
        adapter(ForwardBatch.pack([Segment(torch.tensor(PREFIX[:3]), torch.arange(3), b[:3])]), store)
        segments = [Segment(torch.tensor([5, 6]), torch.arange(7, 9), a[:9]),
                    Segment(torch.tensor([9]), torch.tensor([3]), b[:4])]
        together = adapter(ForwardBatch.pack(segments), store).logits
        alone = torch.cat([adapter(ForwardBatch.pack([s]), store).logits for s in segments])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[:2], hf_logits(adapter, PREFIX + [5, 6])[-2:], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(together[2], hf_logits(adapter, PREFIX[:3] + [9])[-1], atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A random GPT-2 saved as a Hugging Face directory, with the embedded model's tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from forerun.models.embedded import resolve_model_dir

    embedded = resolve_model_dir(None)
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=49152, n_positions=256, n_embd=32, n_layer=2, n_head=4, initializer_range=0.5)
    GPT2LMHeadModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded / name, path / name)
    return path


def test_loading_a_non_llama_directory_warns_and_generates(gpt2_dir):
    with pytest.warns(UserWarning, match="slower transformers adapter"):
        llm = LLM(str(gpt2_dir))
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ar = llm.generate("Hello there, hello there", params, spec=SpecConfig(method="ar"), chat=False)[0]
    pld = llm.generate("Hello there, hello there", params, spec=SpecConfig(method="pld"), chat=False)[0]
    assert pld.token_ids == ar.token_ids and len(ar.token_ids) == 12
    with pytest.raises(ValueError, match="needs the native runtime"):
        LLM(str(gpt2_dir), quant="q4")


@pytest.mark.parametrize("method", ["recycle", "stand", "lookahead"])
def test_tree_drafters_match_ar_through_the_adapter(method):
    llm = LLM(runtime=tiny_hf_runtime(seed=1))
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    prompt = list(range(10, 30)) * 2
    ar = llm.generate_ids(prompt, params, SpecConfig(method="ar"))
    out = llm.generate_ids(prompt, params, SpecConfig(method=method))
    assert out.token_ids == ar.token_ids

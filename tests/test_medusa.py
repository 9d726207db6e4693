"""Medusa heads: both checkpoint layouts (vLLM's and FasterDecoding's) against an independent reference
forward, one clear error for each malformed checkpoint, greedy output equal to `ar` through chains and
trees, training on a tiny target (acceptance far above an untrained head's, a stopped run resumes to
the same state).

The sampling distribution through a head's tree is checked in test_sampling_end_to_end.py,
batched-equals-alone and every-method-at-once in test_engine.py (medusa is a registered method)."""
import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import cycle_runtime, random_medusa_head, tiny_runtime
from helpers_decoding import GREEDY, PROMPTS, reference
from forerun import LLM, SamplingParams, SpecConfig
from forerun.config import EngineConfig
from forerun.drafters.medusa import Medusa
from forerun.heads import data as head_data
from forerun.heads.medusa import load_head, new_head, save_head
from forerun.heads.medusa_train import MedusaTrainConfig, train_medusa

pytestmark = pytest.mark.usefixtures("single_thread")

V, D = 64, 32  # the tiny targets' vocabulary and hidden size


@pytest.fixture(scope="module")
def target(tiny_llama_each_format):
    return tiny_llama_each_format


# -- checkpoints in the upstream layouts, with an upstream-style reference forward ------------------------

def vllm_checkpoint(folder, heads=3, layers=1, truncated=32, bias=True, shared=False, full_rows=False,
                    logit_scale=1.0, seed=0):
    """A folder in vLLM's Medusa layout (vllm/model_executor/models/medusa.py and
    transformers_utils/configs/medusa.py), random weights. Returns its tensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k in range(heads):
        for layer in range(layers):
            tensors[f"blocks.{k}.layers.{layer}.weight"] = torch.randn(D, D, generator=g) * 0.3
            if bias:
                tensors[f"blocks.{k}.layers.{layer}.bias"] = torch.randn(D, generator=g) * 0.3
    rows = V if full_rows or truncated == V else truncated
    for k in range(1 if shared else heads):
        tensors[f"lm_heads.{k}.weight"] = torch.randn(rows, D, generator=g)
    config = {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": D, "vocab_size": V,
              "num_heads": heads, "num_hidden_layers": layers, "max_paths": 64, "topk": 10}
    if truncated < V:
        tensors["token_map"] = torch.randperm(V, generator=g)[:truncated]
        config["truncated_vocab_size"] = truncated
    if bias:
        config["medusa_fc_bias"] = True
    if shared:
        config["original_lm_head"] = True
    if logit_scale != 1.0:
        config["logit_scale"] = logit_scale
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return tensors, config


def vllm_reference(tensors, config, hidden):
    """vLLM's forward, written from its source: [heads, N, V] logits, -inf outside the token map."""
    out = []
    for k in range(config["num_heads"]):
        x = hidden
        for layer in range(config["num_hidden_layers"]):
            x = x + F.silu(F.linear(x, tensors[f"blocks.{k}.layers.{layer}.weight"],
                                    tensors.get(f"blocks.{k}.layers.{layer}.bias")))
        lm = tensors["lm_heads.0.weight" if config.get("original_lm_head") else f"lm_heads.{k}.weight"]
        if "token_map" in tensors and lm.shape[0] == V:
            lm = lm[tensors["token_map"]]
        logits = F.linear(x, lm) * config.get("logit_scale", 1.0)
        if "token_map" in tensors:
            full = torch.full((x.shape[0], V), float("-inf"))
            full[:, tensors["token_map"]] = logits
            logits = full
        out.append(logits)
    return torch.stack(out)


class ResBlock(nn.Module):  # FasterDecoding's, as medusa/model/medusa_model.py defines it
    def __init__(self, hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def fasterdecoding_heads(heads=3, layers=1, width=D, seed=0) -> nn.ModuleList:
    """FasterDecoding's `medusa_head`: per head `[ResBlock] * layers` (one block repeated, as upstream
    builds it) and an output projection over the whole vocabulary."""
    torch.manual_seed(seed)
    modules = nn.ModuleList([nn.Sequential(*([ResBlock(width)] * layers), nn.Linear(width, V, bias=False))
                             for _ in range(heads)])
    with torch.no_grad():
        for p in modules.parameters():
            p.normal_(0, 0.3)
    return modules


def full_logits(head, hidden):
    """Our head's [K, N, V] logits, -inf outside its draft vocabulary."""
    draft = head(hidden)
    full = torch.full((*draft.shape[:2], V), float("-inf"))
    full[:, :, head.draft_ids] = draft
    return full


@pytest.mark.parametrize("variant", [dict(), dict(layers=2, bias=False, truncated=V), dict(shared=True),
                                     dict(full_rows=True, logit_scale=0.5)],
                         ids=["truncated", "two-blocks-no-bias-full-vocab", "original-lm-head", "full-rows-scaled"])
def test_vllm_layout_loads_and_matches_its_forward(tmp_path, variant):
    rt = tiny_runtime("llama", seed=1)
    tensors, config = vllm_checkpoint(tmp_path, **variant)
    head = load_head(tmp_path, rt)
    hidden = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(full_logits(head, hidden), vllm_reference(tensors, config, hidden))


@pytest.mark.parametrize("layers, file", [(1, "medusa_lm_head.safetensors"), (2, "medusa_lm_head.pt")])
def test_fasterdecoding_layout_loads_and_matches_its_forward(tmp_path, layers, file):
    from safetensors.torch import save_file

    rt = tiny_runtime("llama", seed=1)
    modules = fasterdecoding_heads(layers=layers)
    state = modules.state_dict()
    assert f"0.{layers - 1}.linear.weight" in state and f"2.{layers}.weight" in state  # the upstream names
    if file.endswith(".pt"):
        torch.save(state, tmp_path / file)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / file))
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": layers,
                                                      "base_model_name_or_path": "tiny"}))
    head = load_head(tmp_path, rt)
    hidden = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.stack([m(hidden) for m in modules])
    torch.testing.assert_close(full_logits(head, hidden), expected)


def test_saved_heads_load_back_and_the_cpu_kernels_agree(tmp_path):
    rt = tiny_runtime("llama", seed=1)
    head = random_medusa_head(rt, draft_vocab=32, layers=2)
    save_head(head, tmp_path, dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["truncated_vocab_size"] == 32 and config["medusa_fc_bias"] is True
    loaded = load_head(tmp_path, rt)
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    hidden = torch.randn(4, D, generator=torch.Generator().manual_seed(2))
    expected = head(hidden)
    assert torch.allclose(torch.stack(list(head.each_head(hidden))), expected, atol=1e-5)
    for kind, tolerance in ((None, 1e-5), ("q8", 0.02)):  # q8: rounding of 8-bit blocks, relative to the logits
        loaded.pack_for_cpu(kind)
        error = (torch.stack(list(loaded.each_head(hidden))) - expected).abs().max() / expected.abs().max()
        assert error < tolerance, (kind, error)


@pytest.mark.parametrize("break_it, message", [
    (lambda cfg, t: cfg.update(hidden_size=48), "reads hidden states 48 wide, the target's hidden size is 32"),
    (lambda cfg, t: cfg.update(vocab_size=100), "vocabulary has 100 tokens, the target's 64"),
    (lambda cfg, t: t.pop("blocks.1.layers.0.weight"), "missing tensor blocks.1.layers.0.weight"),
    (lambda cfg, t: t.pop("blocks.2.layers.0.bias"), "missing tensor blocks.2.layers.0.bias"),
    (lambda cfg, t: t.update({"lm_heads.2.weight": t["lm_heads.2.weight"][:20]}),
     r"lm_heads.2.weight has shape \(20, 32\), expected \(32, 32\)"),
    (lambda cfg, t: t.update(token_map=t["token_map"] + 40), "token_map does not name 32 distinct target tokens"),
    (lambda cfg, t: t.pop("token_map"), "missing tensor token_map"),
    (lambda cfg, t: cfg.pop("num_heads"), "num_heads missing"),
], ids=["hidden-size", "vocabulary", "missing-block", "missing-bias", "shape", "token-map", "no-token-map",
        "no-head-count"])
def test_a_malformed_vllm_checkpoint_gets_one_clear_error(tmp_path, break_it, message):
    from safetensors.torch import save_file

    rt = tiny_runtime("llama", seed=1)
    tensors, config = vllm_checkpoint(tmp_path)
    break_it(config, tensors)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        load_head(tmp_path, rt)


@pytest.mark.parametrize("width, drop, message", [
    (48, None, "reads hidden states 48 wide, the target's hidden size is 32"),
    (D, "1.1.weight", "missing tensor 1.1.weight"),
    (D, "2.0.linear.bias", "missing tensor 2.0.linear.bias"),
], ids=["hidden-size", "missing-projection", "missing-bias"])
def test_a_malformed_fasterdecoding_checkpoint_gets_one_clear_error(tmp_path, width, drop, message):
    rt = tiny_runtime("llama", seed=1)
    state = fasterdecoding_heads(width=width).state_dict()
    if drop:
        state.pop(drop)
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 1}))
    with pytest.raises(ValueError, match=message):
        load_head(tmp_path, rt)


def test_no_head_is_a_clear_error(tmp_path):
    rt = tiny_runtime("llama", seed=1)
    with pytest.raises(ValueError, match="medusa: no head at"):  # none ships: it must be given
        LLM(runtime=rt).generate_ids([1, 2], GREEDY, SpecConfig(method="medusa"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_head(tmp_path, rt)


# -- greedy output equals ar ------------------------------------------------------------------------------

ALWAYS = {"min_accept": 0.0}  # a random head doubts every draft: draft anyway, to test the drafts


@pytest.mark.parametrize("spec", [SpecConfig(method="medusa", options=ALWAYS),
                                  SpecConfig(method="medusa", adaptive=False, num_draft=3, options=ALWAYS),
                                  SpecConfig(method="medusa", tree_width=3, options={"nodes": 10, **ALWAYS}),
                                  SpecConfig(method="medusa", tree_width=2, budget="goodput",
                                             options={"topk": 4, **ALWAYS})],
                         ids=["chain", "chain-fixed", "tree", "tree-topk-goodput"])
def test_greedy_matches_ar(target, spec):
    llm = LLM(runtime=target)
    llm.use_drafter(spec, Medusa(target, spec, head=random_medusa_head(target, draft_vocab=32)))
    drafted = []
    for prompt in PROMPTS:
        out = llm.generate_ids(prompt, GREEDY, spec)
        assert out.token_ids == reference(llm, prompt)
        drafted.append(out.stats.draft_tokens)
    assert all(drafted) if not spec.goodput else drafted[0], drafted


def test_a_batch_and_n_samples_match_ar(target):
    """Sequences of one drafter draft together (one head row each); the samples of an n > 1 request
    start from what the first saw."""
    spec = SpecConfig(method="medusa", tree_width=2, options=ALWAYS)
    llm = LLM(runtime=target, engine=EngineConfig(max_num_seqs=4))
    llm.use_drafter(spec, Medusa(target, spec, head=random_medusa_head(target, draft_vocab=32)))
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    outs = llm.generate_batch_ids(PROMPTS + [PROMPTS[0][:3]], params, spec)
    assert [o.token_ids for o in outs] == [reference(llm, p)[:30] for p in PROMPTS + [PROMPTS[0][:3]]]
    out = llm.generate_batch_ids([PROMPTS[2]], SamplingParams(n=3, max_new_tokens=20, ignore_eos=True), spec)[0]
    assert all(s.token_ids == reference(llm, PROMPTS[2])[:20] and s.stats.draft_tokens > 0 for s in out.samples)


class Watched(Medusa):
    """Medusa, keeping each draft with the confidences the drafter gave its nodes and the floor then."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def propose_batch(self, seqs, depths):
        floor = self.calibration.floor(self.opts.min_accept)
        drafts = super().propose_batch(seqs, depths)
        self.seen += [(d, s.draft_state.confidence, floor) for d, s in zip(drafts, seqs)]
        return drafts


@pytest.mark.parametrize("tree_width", [1, 3])
def test_nodes_below_min_accept_are_not_drafted(target, tree_width):
    spec = SpecConfig(method="medusa", num_draft=3, adaptive=False, tree_width=tree_width,
                      options={"min_accept": 0.05, "nodes": 12})
    head = random_medusa_head(target, draft_vocab=32, scale=0.6)  # confident, often wrongly
    llm = LLM(runtime=target)
    drafter = Watched(target, spec, head=head)
    llm.use_drafter(spec, drafter)
    for prompt in PROMPTS:
        assert llm.generate_ids(prompt, GREEDY, spec).token_ids == reference(llm, prompt)
    sizes = []
    for draft, confidence, floor in drafter.seen:
        if confidence is None:  # no hidden state yet (a request's first step)
            assert draft.size == 1
            continue
        assert len(confidence) == draft.size and all(c >= floor for c in confidence[1:]), (confidence, floor)
        sizes.append(draft.size)
    assert min(sizes) < 4 and max(sizes) > 1, sizes  # the floor cut some drafts and kept others
    assert drafter.calibration.factor != 1.0


def test_a_doubtful_head_drafts_nothing_and_matches_ar(target):
    spec = SpecConfig(method="medusa", options={"min_accept": 0.95})
    llm = LLM(runtime=target)
    llm.use_drafter(spec, Medusa(target, spec, head=random_medusa_head(target, draft_vocab=32)))
    out = llm.generate_ids(PROMPTS[0], GREEDY, spec)
    assert out.token_ids == reference(llm, PROMPTS[0]) and out.stats.draft_tokens == 0


# -- training ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cycle_records(tmp_path_factory):
    """Replies of the cycle model (conftest.cycle_runtime) to random prompts, with the target's hidden
    states (the recorder's features are asked of one layer only: Medusa does not read them)."""
    runtime, _ = cycle_runtime(seed=3)
    llm = LLM(runtime=runtime, engine=EngineConfig(prefix_caching=False))
    rng = random.Random(0)
    prompts = [{"id": f"p{i}", "source": "random", "ids": [rng.randrange(64) for _ in range(rng.randrange(3, 12))]}
               for i in range(48)]
    out = tmp_path_factory.mktemp("records")
    head_data.record(llm, prompts, out, (1,), max_new_tokens=24, in_flight=16, shard_size=20)
    return runtime, head_data.load_shards(out)[1]


CYCLE = MedusaTrainConfig(heads=3, draft_vocab=64, epochs=5, lr=1e-2, warmup=5, batch_rows=64, eval_every=1000,
                          checkpoint_every=1000, heldout=0.25)


def test_training_raises_acceptance_and_a_trained_head_drafts_what_the_target_says(cycle_records, tmp_path):
    runtime, records = cycle_records
    train_medusa(runtime, records, tmp_path, CYCLE, log=lambda *_: None, progress=False)
    curve = json.loads((tmp_path / "curve.json").read_text())["curve"]
    before, after = curve[0]["acceptance"], curve[-1]["acceptance"]
    assert after[0] > before[0] + 0.8 and after[2] > 0.8, (before, after)
    assert (tmp_path / "head" / "model.safetensors").is_file()
    llm = LLM(runtime=runtime)
    prompt = [5, 9, 1, 30, 2]
    untrained = SpecConfig(method="medusa", tree_width=2, options=ALWAYS)
    llm.use_drafter(untrained, Medusa(runtime, untrained, head=new_head(runtime, 3, torch.arange(64))))
    tau = {"untrained": llm.generate_ids(prompt, GREEDY, untrained).stats.mean_accepted}
    for name, spec in (("chain", SpecConfig(method="medusa", options={"head": str(tmp_path / "head")})),
                       ("tree", SpecConfig(method="medusa", tree_width=2, options={"head": str(tmp_path / "head")}))):
        out = llm.generate_ids(prompt, GREEDY, spec)
        assert out.token_ids == reference(llm, prompt)
        tau[name] = out.stats.mean_accepted
    assert tau["chain"] > 2.5 and tau["tree"] > 2.5 and tau["untrained"] < 1.3, tau


def test_a_stopped_run_resumes_to_the_same_state(cycle_records, tmp_path):
    runtime, records = cycle_records
    quiet = dict(log=lambda *_: None, progress=False)
    stopped = train_medusa(runtime, records, tmp_path / "resumed", CYCLE, steps=9, **quiet)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 9
    assert not (tmp_path / "resumed" / "head").exists()  # not finished: nothing saved but the checkpoint
    resumed = train_medusa(runtime, records, tmp_path / "resumed", CYCLE, **quiet)
    straight = train_medusa(runtime, records, tmp_path / "straight", CYCLE, **quiet)
    assert any(not torch.equal(a, b) for a, b in zip(stopped.state_dict().values(), straight.state_dict().values()))
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert (json.loads((tmp_path / "resumed" / "curve.json").read_text())["curve"]
            == json.loads((tmp_path / "straight" / "curve.json").read_text())["curve"])

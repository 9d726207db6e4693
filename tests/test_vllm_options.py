"""The options vLLM users already know, as forerun reads them: --max-model-len, --dtype auto,
--chat-template, generation_config.json defaults and --speculative-config."""
from __future__ import annotations

import json

import pytest

from helpers_serve import tiny_model_dir
from forerun import EngineConfig
from forerun.cli import build_parser
from forerun.cli_args import spec_config
from forerun.config import GenerationDefaults, SamplingParams, SpecConfig
from forerun.drafters.registry import methods
from forerun.llm import LLM
from forerun.models.runtime import auto_dtype, load
from forerun.models.tokenizer import chat_template_text
from forerun.serve import requests as rq
from forerun.serve.app import ServeConfig
from forerun.serve.errors import APIError
from forerun.speculative_config import parse_speculative_config

CONTEXT = 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model of a 256-token context whose generation_config.json recommends sampling."""
    path = tiny_model_dir(tmp_path_factory.mktemp("tiny"), context=CONTEXT)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5, do_sample=True)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


# -- --max-model-len --------------------------------------------------------------------------------------

def test_max_model_len_caps_the_context_and_the_pool(tiny):
    whole = LLM(str(tiny), engine=EngineConfig(max_num_seqs=1))
    capped = LLM(str(tiny), engine=EngineConfig(max_num_seqs=1, max_model_len=64))
    pool = capped.engine.pool
    assert (whole.engine.context_length, capped.engine.context_length) == (CONTEXT, 64)
    # the pool's floor is one context: a capped one needs no more than the cap
    assert whole.engine.pool.num_blocks * pool.block_size == CONTEXT
    assert pool.num_blocks * pool.block_size == 64
    # a request up to the cap needs a block or two of slack beyond it (the engine's reservation)
    capped = LLM(runtime=capped.runtime, engine=EngineConfig(max_model_len=64, kv_cache_tokens=256))
    out = capped.generate_ids(list(range(1, 61)), SamplingParams(max_new_tokens=50, ignore_eos=True), SpecConfig())
    assert len(out.token_ids) == 4 and out.finish_reason == "length"  # 60 + 4 = 64 tokens
    with pytest.raises(ValueError, match="70 tokens; max_model_len holds 64"):
        capped.generate_ids(list(range(1, 71)), SamplingParams(), SpecConfig())


def test_max_model_len_past_the_context_is_refused(tiny):
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        LLM(str(tiny), engine=EngineConfig(max_model_len=512))
    with pytest.raises(ValueError, match="max_model_len must be >= 2"):
        EngineConfig(max_model_len=1)


def test_the_flag_reaches_the_engine_config():
    a = build_parser().parse_args(["generate", "--max-model-len", "4096", "x"])
    from forerun.cli_args import engine_config

    assert engine_config(a).max_model_len == 4096


# -- --dtype auto -----------------------------------------------------------------------------------------

def test_dtype_auto_is_float32_on_the_cpu(monkeypatch):
    import torch

    assert auto_dtype("auto", "cpu") == "float32" and auto_dtype("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert auto_dtype("auto", "cuda") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert auto_dtype("auto", "cuda:1") == "bfloat16"
    assert build_parser().parse_args(["generate", "x"]).dtype == "float32"  # forerun's: exact on a GPU too


# -- --chat-template --------------------------------------------------------------------------------------

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}"


def test_a_chat_template_from_a_file_or_as_text(tiny, tmp_path):
    file = tmp_path / "t.jinja"
    file.write_text(TEMPLATE)
    assert chat_template_text(str(file)) == TEMPLATE == chat_template_text(TEMPLATE)
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        chat_template_text(str(tmp_path / "missing.jinja"))
    runtime = load(str(tiny), chat_template=str(file))
    messages = [{"role": "user", "content": "hi"}]
    assert runtime.tokenizer.apply_chat_template(messages) == "[user] hi<|im_end|>"
    assert runtime.tokenizer.encode("<|im_end|>", add_bos=False)[0] in runtime.tokenizer.eos_token_ids
    with pytest.raises(ValueError, match="does not parse"):
        load(str(tiny), chat_template="{% for %}")


# -- generation_config.json -------------------------------------------------------------------------------

def test_generation_defaults_are_read_and_checked(tiny):
    runtime = load(str(tiny))
    assert runtime.generation == GenerationDefaults(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5)
    assert GenerationDefaults.from_generation_config({"temperature": 1, "do_sample": True}).given() == {"temperature": 1.0}
    with pytest.raises(ValueError, match="generation_config.json: top_p"):
        GenerationDefaults.from_generation_config({"top_p": 1.5})


def test_the_python_api_defaults_to_the_models_sampling(tiny):
    assert LLM(str(tiny)).default_params == SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5)
    assert LLM(str(tiny), generation_config="none").default_params == SamplingParams()
    with pytest.raises(ValueError, match="auto, none or a folder"):
        LLM(str(tiny), generation_config="vllm")


def test_a_folder_gives_the_generation_defaults_as_vllms_flag_does(tiny, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 5}))
    assert LLM(str(tiny), generation_config=str(tmp_path)).default_params == SamplingParams(temperature=0.3, top_k=5)
    assert rq.Served.of(LLM(str(tiny)).engine, str(tmp_path)).defaults == GenerationDefaults(temperature=0.3, top_k=5)
    assert GenerationDefaults.chosen("vllm", GenerationDefaults(top_k=3)) == GenerationDefaults()
    with pytest.raises(ValueError, match="folder holding generation_config.json"):
        LLM(str(tiny), generation_config=str(tmp_path / "missing"))
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        GenerationDefaults.chosen(str(tmp_path), GenerationDefaults())
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        GenerationDefaults.chosen(str(tmp_path), GenerationDefaults())
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 7}))
    with pytest.raises(ValueError, match="top_p"):
        ServeConfig("m", generation_config=str(tmp_path))


class _Pool:
    num_blocks, block_size = 64, 16

    def blocks_for(self, slots: int) -> int:
        return -(-slots // self.block_size)


def _served(defaults: GenerationDefaults) -> rq.Served:
    return rq.Served(tokenizer=None, context=CONTEXT, vocab_size=1000, pool=_Pool(), max_num_seqs=4,
                     defaults=defaults)


def test_requests_take_the_models_defaults_for_what_they_leave_unset():
    from forerun.serve.protocol import ChatCompletionRequest

    served = _served(GenerationDefaults(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5))
    unset = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}])
    given = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], temperature=0.2, top_p=0.5, top_k=3)
    assert rq.max_new_tokens(None, 10, 1, served) == 5 and rq.max_new_tokens(9, 10, 1, served) == 9
    params = rq.sampling_params(unset, 5, None, served)
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.9, 20)
    params = rq.sampling_params(given, 5, None, served)
    assert (params.temperature, params.top_p, params.top_k) == (0.2, 0.5, 3)
    params = rq.sampling_params(unset, 5, None, _served(GenerationDefaults()))  # off: OpenAI's defaults
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, 0)
    assert rq.max_new_tokens(None, 10, 1, _served(GenerationDefaults())) == CONTEXT - 10
    with pytest.raises(APIError):
        rq.max_new_tokens(CONTEXT, 10, 1, served)


# -- --speculative-config ---------------------------------------------------------------------------------

def _spec(*flags: str) -> SpecConfig:
    return spec_config(build_parser().parse_args(["generate", *flags, "x"]))


@pytest.mark.parametrize("vllm, forerun", [("ngram", "pld"), ("eagle", "eagle"), ("eagle3", "eagle"),
                                           ("medusa", "medusa"), ("draft_model", "draft")])
def test_vllms_methods_map_onto_forerun_drafters(vllm, forerun):
    config = {"method": vllm, "num_speculative_tokens": 5}
    if vllm not in ("ngram", "eagle", "eagle3"):
        config["model"] = "some/model"
    spec = _spec("--speculative-config", json.dumps(config))
    assert (spec.method, spec.num_draft, spec.adaptive) == (forerun, 5, False)
    if forerun == "draft":
        assert spec.draft_model == "some/model"
    if forerun == "medusa":
        assert dict(spec.options) == {"head": "some/model"}


def test_the_vllm_form_keeps_forerun_names_and_flags():
    spec = _spec("--speculative-config", '{"method": "ngram", "prompt_lookup_max": 4, "prompt_lookup_min": 2}',
                 "--guard", "--budget", "goodput")
    assert (spec.method, spec.ngram_max, spec.ngram_min, spec.guard, spec.budget) == ("pld", 4, 2, True, "goodput")
    assert spec.adaptive  # no length given: forerun's adaptive one
    assert _spec("--speculative-config", '{"method": "layer-skip"}').method == "layer-skip"
    assert _spec("--speculative-config", '{"model": "d"}').method == "draft"  # vLLM: a model alone is a draft model


@pytest.mark.parametrize("text, error", [
    ('{"method": "mtp"}', "unknown method 'mtp'"),
    ('{"method": "ngram", "draft_tensor_parallel_size": 2}', "no counterpart for draft_tensor_parallel_size"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "positive integer"),
    ('{"method": "ngram", "model": "x"}', "takes no model"),
    ('{"num_speculative_tokens": 3}', "needs a method"),
    ("[1]", "JSON object"),
    ("{method: ngram}", "not JSON"),
])
def test_bad_speculative_configs_are_refused(text, error):
    with pytest.raises(ValueError, match=error):
        parse_speculative_config(text, methods())


def test_the_vllm_form_and_forerun_flags_that_say_the_same_conflict():
    with pytest.raises(ValueError, match="--num-draft"):
        _spec("--speculative-config", '{"method": "ngram"}', "--num-draft", "3")

"""Models named by Hub id, read from a Hugging Face cache laid out here (no network: HF_HUB_OFFLINE is
set in each test's environment only), and checkpoints split into shards by an index."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file

from helpers_serve import REPO, tiny_model_dir
from forerun.config import EngineConfig, SamplingParams, SpecConfig
from forerun.llm import LLM
from forerun.models import hub
from forerun.models.embedded import embedded_gguf_path, hub_gguf, resolve_model_dir
from forerun.models.runtime import weight_files

MAIN, TAGGED = "a" * 40, "b" * 40  # the commits of the two snapshots
PROMPT = [1, 5, 9, 200, 31, 7]
SMALL = EngineConfig(kv_cache_tokens=1024, max_num_seqs=2)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hub cache holding org/tiny at two commits: main, and the tag v1 (other weights)."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / "models--org--tiny"
    for commit, ref, seed in ((MAIN, "main", 0), (TAGGED, "v1", 1)):
        tiny_model_dir(repo / "snapshots" / commit, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return root


@pytest.fixture
def offline(hub_cache, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.chdir(hub_cache)  # where no ./org/tiny exists
    return hub_cache


def snapshot(cache: Path, commit: str) -> Path:
    return cache / "models--org--tiny" / "snapshots" / commit


def greedy(llm: LLM) -> list[int]:
    return llm.generate_ids(PROMPT, SamplingParams(max_new_tokens=6, ignore_eos=True), SpecConfig()).token_ids


def test_a_hub_id_resolves_to_its_cached_snapshot(offline):
    assert resolve_model_dir("org/tiny") == snapshot(offline, MAIN)
    assert resolve_model_dir("org/tiny", revision="v1") == snapshot(offline, TAGGED)
    assert resolve_model_dir("org/tiny", revision=TAGGED) == snapshot(offline, TAGGED)


def test_a_hub_id_loads_the_weights_of_its_snapshot(offline):
    by_id = LLM("org/tiny", revision="v1", engine=SMALL)
    assert by_id.runtime.name == "org/tiny"
    assert greedy(by_id) == greedy(LLM(str(snapshot(offline, TAGGED)), engine=SMALL))
    assert greedy(by_id) != greedy(LLM(str(snapshot(offline, MAIN)), engine=SMALL))


def test_what_was_tried_is_named_when_nothing_works(offline):
    with pytest.raises(FileNotFoundError) as failed:
        resolve_model_dir("org/missing")
    message = str(failed.value)
    assert "./org/missing" in message and "org/missing at revision main" in message
    assert str(offline) in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(FileNotFoundError, match="revision v9"):
        resolve_model_dir("org/tiny", revision="v9")
    with pytest.raises(FileNotFoundError, match="Hub id"):  # a path that is not a Hub id either
        resolve_model_dir("./no/such/dir")


def test_a_local_path_wins_over_a_hub_id_and_takes_no_revision(offline, tmp_path, monkeypatch):
    local = tiny_model_dir(tmp_path / "org" / "tiny", seed=2)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("org/tiny").resolve() == local.resolve()
    with pytest.raises(ValueError, match="local path"):
        resolve_model_dir("org/tiny", revision="v1")


def test_the_command_line_reads_a_hub_id_offline(offline, hub_cache):
    """A fresh process, where HF_HUB_OFFLINE is read as huggingface_hub imports."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "forerun", "generate", "--model", "org/tiny", "--revision", "v1",
                          "--method", "ar", "--max-new-tokens", "6", "--ignore-eos", "--no-chat", "--json",
                          "--kv-cache-tokens", "1024", "Once upon a time"],
                         cwd=hub_cache, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["token_ids"]) == 6
    missing = subprocess.run([sys.executable, "-m", "forerun", "generate", "--model", "org/missing", "x"],
                             cwd=hub_cache, env=env, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "HF_HUB_OFFLINE" in missing.stderr


# -- GGUF files on the Hub --------------------------------------------------------------------------------

@pytest.fixture
def gguf_cache(tmp_path, monkeypatch) -> Path:
    """A Hub cache holding org/smol-GGUF, whose files (links to the embedded GGUF, as the Hub's cache
    links its blobs) are named as GGUF repos name them, with a projector file beside the models."""
    root = tmp_path / "hub"
    repo = root / "models--org--smol-GGUF"
    folder = repo / "snapshots" / MAIN
    folder.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    for name in ("smol-Q4_1.gguf", "smol-Q8_0.gguf", "mmproj-smol-Q4_1.gguf"):
        (folder / name).symlink_to(embedded_gguf_path())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.chdir(root)
    return folder


def test_a_gguf_on_the_hub_is_named_as_llama_cpp_and_vllm_name_it(gguf_cache):
    by_quant = LLM("org/smol-GGUF:q4_1", engine=SMALL)
    assert by_quant.runtime.name == "org/smol-GGUF:q4_1" and by_quant.runtime.model.layers[0].qkv.quant is not None
    assert greedy(by_quant) == greedy(LLM(engine=SMALL))
    assert hub_gguf("org/smol-GGUF/smol-Q8_0.gguf", None) == (str(gguf_cache / "smol-Q8_0.gguf"), None)
    assert hub_gguf("org/smol-GGUF:Q8_0", "main") == (str(gguf_cache / "smol-Q8_0.gguf"), None)
    with pytest.raises(ValueError, match="its GGUF files: smol-Q4_1.gguf, smol-Q8_0.gguf$"):
        LLM("org/smol-GGUF:Q5_K_M")
    with pytest.raises(FileNotFoundError, match="smol-Q6_K.gguf.*HF_HUB_OFFLINE"):
        LLM("org/smol-GGUF/smol-Q6_K.gguf")
    with pytest.raises(FileNotFoundError, match="name it as org/smol-GGUF:QUANT"):
        LLM("org/smol-GGUF")


# -- what is fetched and read -----------------------------------------------------------------------------

MISTRAL_REPO = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "chat_template.jinja", "model.safetensors.index.json",
                "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                "consolidated.safetensors", "params.json", "original/consolidated.00.pth", "pytorch_model.bin"]


def test_only_the_hugging_face_weights_are_fetched():
    fetched = set(filter_repo_objects(MISTRAL_REPO, allow_patterns=hub.FETCHED, ignore_patterns=hub.NOT_FETCHED))
    assert fetched == set(MISTRAL_REPO) - {"consolidated.safetensors", "original/consolidated.00.pth",
                                            "pytorch_model.bin"}


@pytest.fixture(scope="module")
def whole_and_sharded(tmp_path_factory) -> tuple[Path, Path]:
    """The same tiny checkpoint whole, and in two shards with their index beside a Mistral-style
    consolidated copy of the weights under Mistral's names."""
    whole = tiny_model_dir(tmp_path_factory.mktemp("whole"), seed=3)
    sharded = tmp_path_factory.mktemp("sharded")
    for f in whole.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, sharded / f.name)
    weights = load_file(whole / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(sharded / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    mistral = {k.replace("model.layers.", "layers.").replace("self_attn.", "attention."): v for k, v in weights.items()}
    save_file(mistral, str(sharded / "consolidated.safetensors"))
    return whole, sharded


def test_an_index_maps_the_shards_and_the_consolidated_copy_is_left(whole_and_sharded):
    whole, sharded = whole_and_sharded
    assert [f.name for f in weight_files(sharded)] == ["model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"]
    folder = sharded.parent / "no-index"  # no index: every file but the consolidated copy
    folder.mkdir()
    shutil.copy(whole / "model.safetensors", folder / "model.safetensors")
    shutil.copy(sharded / "consolidated.safetensors", folder / "consolidated.safetensors")
    assert [f.name for f in weight_files(folder)] == ["model.safetensors"]
    (sharded.parent / "bad").mkdir()
    (sharded.parent / "bad" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone"}}))
    with pytest.raises(FileNotFoundError, match="gone"):
        weight_files(sharded.parent / "bad")


def test_a_sharded_checkpoint_generates_as_the_whole_one(whole_and_sharded):
    whole, sharded = whole_and_sharded
    assert greedy(LLM(str(sharded), engine=SMALL)) == greedy(LLM(str(whole), engine=SMALL))

"""Models named by a Hugging Face Hub id (`org/name`): a snapshot in the Hub's local cache, downloaded
when the Hub may be reached.

Only what the loader reads is fetched: configs, tokenizer files, chat templates and safetensors
weights. Mistral-style repos ship the same weights twice (`consolidated.safetensors` in Mistral's
own names beside the Hugging Face shards), and Meta's keep theirs under `original/`: both are left on
the Hub. HF_HUB_OFFLINE and HF_HUB_CACHE are read when a model is resolved, not when
huggingface_hub is imported, so a process may set them late (as the tests do).

A GGUF on the Hub is named as llama.cpp's `-hf` and vLLM name it: `org/name:QUANT` (the repo's one
.gguf file whose name holds QUANT, e.g. Q4_K_M) or `org/name/FILE.gguf`; only that file is fetched.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

FETCHED = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
NOT_FETCHED = ["consolidated*", "original/*"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_GGUF_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<quant>[\w.-]+)|/(?P<file>[\w./-]+\.gguf))")
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.gguf$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def looks_like_repo_id(spec: str) -> bool:
    """`org/name`: two parts, starting with a letter or digit, neither of them a path's `..`."""
    return _REPO_ID.fullmatch(spec) is not None and ".." not in spec


def offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE or constants.HF_HUB_OFFLINE


def snapshot_dir(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of `repo_id` at `revision` (default: main): from the cache when offline,
    else checked against the Hub and completed. FileNotFoundError says what was tried."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    local_only = offline()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=local_only,
                                   allow_patterns=FETCHED, ignore_patterns=NOT_FETCHED)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        where = "the Hub is not reached (HF_HUB_OFFLINE is set)" if local_only else f"the Hub said: {_first_line(e)}"
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local path nor a Hugging Face Hub model forerun can reach: tried the "
            f"path ./{repo_id} (does not exist), then the Hub id {repo_id} at revision {revision or 'main'} in "
            f"the cache {cache} (not there), and {where}") from None
    return Path(folder)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def gguf_repo_file(spec: str) -> tuple[str, str | None, str | None] | None:
    """(repo id, quant, file) of `org/name:QUANT` or `org/name/FILE.gguf`, else None."""
    match = _GGUF_ID.fullmatch(spec)
    if match is None or ".." in spec:
        return None
    return match["repo"], match["quant"], match["file"]


def gguf_file(spec: str, revision: str | None = None) -> Path:
    """The local path of the Hub GGUF `spec` names (gguf_repo_file), fetched alone into the Hub's cache
    unless it is there (offline: only the cache). A quant that matches no file, or more than one, is
    an error that lists the repo's GGUF files."""
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, quant, file = gguf_repo_file(spec)
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    local_only = offline()
    where = "the Hub is not reached (HF_HUB_OFFLINE is set)" if local_only else "the Hub"
    try:
        if file is None:
            if local_only:
                folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True,
                                                allow_patterns=["*.gguf"]))
                files = [str(p.relative_to(folder)) for p in folder.rglob("*.gguf")]
            else:
                files = [f for f in HfApi().list_repo_files(repo, revision=revision) if f.endswith(".gguf")]
            file = _file_for(quant, files, f"{repo} (revision {revision or 'main'}, {where})")
        return Path(hf_hub_download(repo, file, revision=revision, cache_dir=cache, local_files_only=local_only))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        said = "" if local_only else f": {_first_line(e)}"
        raise FileNotFoundError(f"{spec!r}: no GGUF {file or quant!r} of the Hub repo {repo} at revision "
                                f"{revision or 'main'} in the cache {cache}, and {where}{said}") from None


def _file_for(quant: str, files: list[str], repo: str) -> str:
    """The one model file of `files` whose name holds `quant` as a part (between - . _ and /), else
    the one that holds it anywhere, case aside; projector (mmproj) files are never models."""
    models = sorted(f for f in files if "mmproj" not in f.lower())
    wanted = quant.upper()
    chosen = [f for f in models if wanted in re.split(r"[-./]", Path(f).name.upper())] or \
             [f for f in models if wanted in Path(f).name.upper()]
    listed = ", ".join(models) or "none"
    if not chosen:
        raise ValueError(f"no GGUF file of {repo} matches {quant!r}; its GGUF files: {listed}")
    if len(chosen) > 1 and not all(_SHARD.search(f) for f in chosen):
        raise ValueError(f"{quant!r} matches more than one GGUF file of {repo}: {', '.join(chosen)}; "
                         "name the file as org/name/FILE.gguf")
    if _SHARD.search(chosen[0]):
        raise ValueError(f"{chosen[0]} is one shard of a split GGUF, which forerun does not read; merge it "
                         "with llama.cpp's gguf-split --merge and give the file's path")
    return chosen[0]

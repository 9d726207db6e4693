"""Models named by a Hugging Face Hub id (`org/name`): a snapshot in the Hub's local cache, downloaded
when the Hub may be reached.

Only what the loader reads is fetched: configs, tokenizer files, chat templates and safetensors
weights. Mistral-style repos ship the same weights twice (`consolidated.safetensors` in Mistral's
own names beside the Hugging Face shards), and Meta's keep theirs under `original/`: both are left on
the Hub. HF_HUB_OFFLINE and HF_HUB_CACHE are read when a model is resolved, not when
huggingface_hub is imported, so a process may set them late (as the tests do).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

FETCHED = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
NOT_FETCHED = ["consolidated*", "original/*"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
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

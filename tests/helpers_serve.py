"""Helpers for the server tests: a tiny model directory a server process can load, and a server
process on a free loopback port that is always stopped."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import random_weights, tiny_args
from safetensors.torch import save_file

from forerun.bench.serving import free_port, stop_process, wait_healthy

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def tiny_model_dir(path: Path, context: int = 256, seed: int = 0) -> Path:
    """A random two-layer Llama with the embedded model's tokenizer (real text, a chat template,
    EOS ids), saved as a Hugging Face directory: a server starts on it in a second."""
    from forerun.models.embedded import embedded_model_dir

    source = embedded_model_dir()
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    args = tiny_args(layers=2, vocab_size=vocab, max_position_embeddings=context)
    path.mkdir(parents=True, exist_ok=True)
    save_file(random_weights(args, seed), str(path / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": args.hidden_size,
              "intermediate_size": args.intermediate_size, "num_hidden_layers": args.num_layers,
              "num_attention_heads": args.num_heads, "num_key_value_heads": args.num_kv_heads,
              "head_dim": args.head_dim, "rms_norm_eps": args.rms_norm_eps, "rope_theta": args.rope_theta,
              "max_position_embeddings": context, "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, path / name)
    return path


class ServerProcess:
    """`python -m forerun serve ARGS` on a free loopback port, stopped by stop() (SIGTERM, then kill);
    `env` adds to the environment it inherits."""

    def __init__(self, *args: str, log: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "forerun", "serve", "--port", str(self.port), *args],
                                     cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 300) -> "ServerProcess":
        if wait_healthy(self.proc, self.url + "/health", timeout):
            return self
        if self.proc.poll() is not None:
            raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
        self.stop()
        raise TimeoutError(f"the server was not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 60) -> int:
        status = stop_process(self.proc, timeout)
        self._log.close()
        return status

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def running_server(*args: str, log: Path, env: dict[str, str] | None = None):
    """For a module fixture: `yield from running_server(...)` yields the server once ready and stops it after."""
    proc = ServerProcess(*args, log=log, env=env)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def openai_client(server: ServerProcess, api_key: str = "none", timeout: float = 120):
    """The official client on a server's /v1, without retries (a test sees the first answer)."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)


def metric(url: str, name: str, **labels: str) -> float:
    """The value of the sample `name` from /metrics whose labels include `labels` (every sample also
    carries model_name); 0 for a labelled counter that has not counted yet."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    if labels:
        return 0.0
    raise KeyError(name)


def sse_payloads(lines) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    return [line[len("data:"):].strip() for line in lines if line.startswith("data:")]

"""The tools people use today, run as contenders beside forerun on the same model and prompt ids.

Each peer is optional: one whose package is missing (or that cannot run this model) is skipped with a
message saying why. Peers are found by name in PEERS; a name may carry a dtype (`hf:bfloat16`).
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from forerun.bench.contenders import ContenderSpec, Label, Output, weight_bytes_per_token
from forerun.config import SamplingParams

PROMPT_LOOKUP_TOKENS = 10  # HF's documented choice for prompt_lookup_num_tokens; llama.cpp's default too


class PeerUnavailable(Exception):
    """A peer that cannot run here; the message says why and how to enable it."""


@dataclass
class PeerContext:
    """What every peer needs to know about the run."""

    model: str | None  # as given to forerun: None (embedded), an HF directory or a .gguf file
    device: str
    default_dtype: str
    eos_ids: frozenset[int]
    draft_model: str | None = None
    threads: int = field(default_factory=torch.get_num_threads)
    # llama.cpp's context: prompt + answer must fit. Kept modest because its prompt-lookup mode keeps
    # logits for every context position (context x vocab floats).
    llama_cpp_context: int = 4096
    _hf_models: dict = field(default_factory=dict)  # (directory, dtype) -> _HFModel, shared by HF peers


def require(module: str, install: str):
    """Import a peer's package, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PeerUnavailable(f"`{module}` is not importable ({e}); install it with: {install}") from None


# -- Hugging Face transformers --------------------------------------------------------------------------


class _ForwardCounter:
    """Counts forward calls of an HF model through a forward hook (target forwards of one generate)."""

    def __init__(self, model):
        self.count = 0
        model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.count += 1


@dataclass
class _HFModel:
    model: object  # a transformers PreTrainedModel
    forwards: _ForwardCounter
    version: str


def _hf_model(ctx: PeerContext, model_dir: Path, dtype: str) -> _HFModel:
    key = (str(model_dir), dtype)
    if key not in ctx._hf_models:
        transformers = require("transformers", "pip install transformers")
        from forerun.models.runtime import resolve_dtype

        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), **{_dtype_kwarg(transformers.__version__): resolve_dtype(dtype)})
        model = model.to(ctx.device).eval()
        ctx._hf_models[key] = _HFModel(model, _ForwardCounter(model), transformers.__version__)
    return ctx._hf_models[key]


def _dtype_kwarg(version: str) -> str:
    major, minor = (int(x) for x in version.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _hf_dir(model: str | None) -> Path:
    from forerun.models.embedded import resolve_model_dir

    return Path(resolve_model_dir(model))


class HFContender:
    """transformers `generate` on the same weights, with a GenerationConfig written out in full so that
    nothing from the model's generation_config.json (top_k, repetition penalty...) changes the output."""

    def __init__(self, name: str, hf: _HFModel, label: Label, eos_ids: frozenset[int],
                 speculation: dict | None = None, assistant_model=None):
        self.name, self.hf, self.label = name, hf, label
        self.eos_ids = sorted(eos_ids)
        self.speculation = speculation or {}  # GenerationConfig fields, e.g. prompt_lookup_num_tokens
        self.assistant_model = assistant_model

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Output:
        from transformers import GenerationConfig

        sampled = not params.greedy
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=sampled,
            temperature=params.temperature if sampled else None, top_k=params.top_k if sampled else None,
            top_p=params.top_p if sampled else None, eos_token_id=self.eos_ids or None,
            pad_token_id=self.eos_ids[0] if self.eos_ids else None,
            min_new_tokens=params.max_new_tokens if params.ignore_eos else None, **self.speculation,
        )
        if sampled and params.seed is not None:
            torch.manual_seed(params.seed)
        model = self.hf.model
        ids = torch.tensor([prompt_ids], device=model.device)
        self.hf.forwards.count = 0
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 assistant_model=self.assistant_model)
        new = out[0, len(prompt_ids):].tolist()
        if not params.ignore_eos:
            new = _cut_at(new, self.eos_ids)
        forwards = self.hf.forwards.count
        return Output(token_ids=new, target_forwards=forwards,
                      accept_histogram={1: forwards} if self.is_plain_ar else None)

    @property
    def is_plain_ar(self) -> bool:
        """Plain AR: every forward yields one token, so the accept histogram is known."""
        return not self.speculation and self.assistant_model is None


def _cut_at(ids: list[int], stop: list[int]) -> list[int]:
    stop_set = set(stop)
    return next((ids[:i] for i, t in enumerate(ids) if t in stop_set), ids)


def _hf_label(hf: _HFModel, method: str, dtype: str, ctx: PeerContext, **extra) -> Label:
    model = hf.model
    return Label(engine=f"transformers {hf.version}", method=method, dtype=dtype, threads=ctx.threads,
                 device=str(model.device),
                 weight_bytes=weight_bytes_per_token(model, model.get_input_embeddings().weight), extra=extra)


def hf_ar(name: str, dtype: str, ctx: PeerContext) -> HFContender:
    hf = _hf_model(ctx, _hf_dir(ctx.model), dtype)
    return HFContender(name, hf, _hf_label(hf, "ar", dtype, ctx), ctx.eos_ids)


def hf_prompt_lookup(name: str, dtype: str, ctx: PeerContext) -> HFContender:
    hf = _hf_model(ctx, _hf_dir(ctx.model), dtype)
    label = _hf_label(hf, "prompt lookup", dtype, ctx, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS)
    return HFContender(name, hf, label, ctx.eos_ids, speculation={"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS})


def hf_assisted(name: str, dtype: str, ctx: PeerContext) -> HFContender:
    if ctx.draft_model is None:
        raise PeerUnavailable("hf-assisted needs a draft model: pass --draft-model")
    hf = _hf_model(ctx, _hf_dir(ctx.model), dtype)
    draft_dir = _hf_dir(ctx.draft_model)
    draft = _hf_model(ctx, draft_dir, dtype)
    label = _hf_label(hf, "assisted generation", dtype, ctx, draft_model=str(ctx.draft_model))
    return HFContender(name, hf, label, ctx.eos_ids, assistant_model=draft.model)


# -- llama.cpp through llama-cpp-python ------------------------------------------------------------------


def _gguf_path(model: str | None) -> Path:
    if model is None:
        from forerun.models.embedded import embedded_gguf_path

        return embedded_gguf_path()
    if Path(model).suffix == ".gguf":
        return Path(model)
    raise PeerUnavailable(f"llama.cpp runs GGUF files; the model {model!r} is not one")


def gguf_weights(path: Path) -> tuple[str, int]:
    """(file type, e.g. "MOSTLY_Q4_1"; weight bytes one AR step reads) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    file_type = "unknown"
    if field is not None:
        code = int(field.parts[field.data[0]][0])
        file_type = gguf.LlamaFileType(code).name if code in gguf.LlamaFileType._value2member_map_ else str(code)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes:  # an untied head: the embedding table is read one row per step
        total -= sizes.get("token_embd.weight", 0)
    return file_type, total


class LlamaCppContender:
    """llama.cpp's own generate loop (with its prompt-lookup drafter when given). Its KV cache is reset
    before each prompt, so no prefix is reused across prompts, as for every other contender."""

    def __init__(self, name: str, llama, label: Label, eos_ids: frozenset[int]):
        self.name, self.llama, self.label, self.eos_ids = name, llama, label, eos_ids

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Output:
        llama = self.llama
        llama.reset()
        if params.seed is not None:
            llama.set_seed(params.seed)
        llama.forwards = 0
        new: list[int] = []
        tokens = llama.generate(prompt_ids, temp=params.temperature, top_k=params.top_k,
                                top_p=params.top_p, min_p=0.0, repeat_penalty=1.0, reset=True)
        for token in tokens:
            if token in self.eos_ids and not params.ignore_eos:
                break
            new.append(int(token))
            if len(new) >= params.max_new_tokens:
                break
        return Output(token_ids=new, target_forwards=llama.forwards,
                      accept_histogram={1: llama.forwards} if llama.draft_model is None else None)


def _llama_class(llama_cpp):
    class CountingLlama(llama_cpp.Llama):
        """Counts eval() calls: one per target forward (the prompt, then each step's token + drafts)."""

        forwards = 0

        def eval(self, tokens):
            self.forwards += 1
            return super().eval(tokens)

    return CountingLlama


def _llama_cpp(name: str, ctx: PeerContext, prompt_lookup: bool) -> LlamaCppContender:
    llama_cpp = require("llama_cpp", 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python')
    path = _gguf_path(ctx.model)
    draft = None
    if prompt_lookup:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=PROMPT_LOOKUP_TOKENS)
    gpu = ctx.device.startswith("cuda") and llama_cpp.llama_supports_gpu_offload()
    llama = _llama_class(llama_cpp)(
        model_path=str(path), n_ctx=ctx.llama_cpp_context, n_threads=ctx.threads, n_threads_batch=ctx.threads,
        n_gpu_layers=-1 if gpu else 0, draft_model=draft, verbose=False,
        # With a draft model llama-cpp-python keeps logits for every position, but it sizes its logits
        # buffer by this flag; left False, any prompt longer than n_batch fails to fit (0.3.x).
        logits_all=prompt_lookup)
    file_type, weight_bytes = gguf_weights(path)
    method = "prompt lookup" if prompt_lookup else "ar"
    extra = {"num_pred_tokens": PROMPT_LOOKUP_TOKENS} if prompt_lookup else {}
    label = Label(engine=f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", method=method,
                  dtype=f"GGUF {file_type}", threads=ctx.threads, device="cuda" if gpu else "cpu",
                  weight_bytes=weight_bytes, extra={"gguf": path.name, **extra})
    return LlamaCppContender(name, llama, label, ctx.eos_ids)


def llama_cpp_ar(name: str, dtype: str, ctx: PeerContext) -> LlamaCppContender:
    return _llama_cpp(name, ctx, prompt_lookup=False)


def llama_cpp_prompt_lookup(name: str, dtype: str, ctx: PeerContext) -> LlamaCppContender:
    return _llama_cpp(name, ctx, prompt_lookup=True)


PeerFactory = Callable[[str, str, PeerContext], object]
PEERS: dict[str, PeerFactory] = {
    "hf": hf_ar,
    "hf-pld": hf_prompt_lookup,
    "hf-assisted": hf_assisted,
    "llama.cpp": llama_cpp_ar,
    "llama.cpp-pld": llama_cpp_prompt_lookup,
}


def build_peers(specs: list[str], ctx: PeerContext, log: Callable[[str], None] = print) -> tuple[list, dict[str, str]]:
    """Contenders for the peers that can run, and {name: reason} for those skipped (each also logged)."""
    contenders, skipped = [], {}
    for text in specs:
        spec = ContenderSpec.parse(text)
        if spec.method not in PEERS:
            raise ValueError(f"unknown peer {spec.method!r}; choose from {', '.join(PEERS)}")
        start = time.perf_counter()
        try:
            contenders.append(PEERS[spec.method](spec.text, spec.dtype or ctx.default_dtype, ctx))
        except PeerUnavailable as e:
            skipped[spec.text] = str(e)
            log(f"skipping peer {spec.text}: {e}")
            continue
        log(f"loaded peer {spec.text} in {time.perf_counter() - start:.1f}s")
    return contenders, skipped

"""A loaded model: weights on a device, its tokenizer, and the way it was loaded."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from forerun.config import GenerationDefaults
from forerun.models.args import SUPPORTED_ARCHS, ModelArgs
from forerun.models.llama import Transformer
from forerun.models.quant import GGUF_READERS, QuantWeight

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    model: Transformer
    tokenizer: object | None  # forerun.models.tokenizer.Tokenizer; None for token-id-only use
    name: str
    generation: GenerationDefaults = GenerationDefaults()  # from the model's generation_config.json

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def context_length(self) -> int:
        return self.model.args.max_position_embeddings


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def auto_dtype(dtype: str, device: str) -> str:
    """`dtype` with "auto" made concrete, as vLLM's --dtype auto: bfloat16 on a GPU that runs it
    (float16 on older ones), float32 on the CPU, where float32 is what the native kernels and q4 run
    and half precision is slower, not faster."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


QUANTS = ("auto", "none", None, "q4")


def build(args: ModelArgs, weights: dict[str, torch.Tensor | QuantWeight], dtype: torch.dtype,
          device: torch.device, quant: str | None = None) -> Transformer:
    """The model from float tensors, and (quant q4, CPU float32) blocks read from a GGUF."""
    weights = {k: v if isinstance(v, QuantWeight) else v.to(device=device, dtype=dtype) for k, v in weights.items()}
    with torch.device(device):
        model = Transformer(args, weights).eval()
    if quant == "q4" and not model.quantize():
        raise ValueError("q4 needs a model whose projection input sizes are multiples of 32")
    if device.type == "cuda":  # on a GPU the float32 head costs next to nothing
        model.float32_logits()
    model.pack_for_cpu()
    return model


def resolve_quant(quant: str | None, model: str | None, dtype: str, device: str,
                  converted: Path | None = None) -> str | None:
    """The quantization a load uses: "q4", or None (the weights in `dtype`).

    "auto" (the default) is q4 where that changes nothing the file says: the weights come from a GGUF
    whose block projections are all of types the kernels run as stored (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K,
    Q6_K: the embedded Q4_1 model, Q4_K_M and Q5_K_M mixes), the model runs in float32 on the CPU,
    and the native kernels build. q4 reads those blocks straight from the file, so its own quantized
    model runs without a float detour. "none" (or None) always dequantizes; "q4" also quantizes the
    float (or otherwise quantized) projections into Q4_1 blocks (lossy)."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; use auto, q4 or none")
    dtype = auto_dtype(dtype, device)
    if quant == "auto":
        if dtype != "float32" or device != "cpu" or not _native_gguf(model, converted):
            return None
        from forerun import kernels

        return "q4" if kernels.cpu_kernels() is not None else None
    if quant == "q4" and (dtype != "float32" or device != "cpu"):
        raise ValueError("quant q4 runs 4-bit block weights with float32 activations on the CPU: "
                         "use --dtype float32 --device cpu")
    return "q4" if quant == "q4" else None


def _native_gguf(model: str | None, converted: Path | None) -> bool:
    from forerun.models.gguf import projection_types

    source = _gguf_source(model)
    if source is None:
        return False
    types = projection_types(source, converted)
    return bool(types) and types <= GGUF_READERS.keys()


def _gguf_source(model: str | None) -> Path | None:
    """The GGUF file `model` names (None: the embedded one), or None if it names none."""
    from forerun.models.embedded import embedded_gguf_path

    try:
        source = embedded_gguf_path() if model is None else Path(model).expanduser()
    except FileNotFoundError:
        return None
    return source if source.suffix == ".gguf" and source.is_file() else None


def load(model: str | None = None, dtype: str = "float32", device: str = "cpu",
         quant: str | None = "auto", revision: str | None = None, chat_template: str | None = None) -> Runtime:
    """Load a model by HF directory, .gguf file, Hub id (`org/name`, at `revision`: a branch, tag or
    commit; a GGUF on the Hub as `org/name:QUANT` or `org/name/FILE.gguf`), or None for the embedded
    SmolLM2-135M-Instruct. dtype "auto": auto_dtype. chat_template:
    a Jinja template, or a file holding one, used instead of the model's (chat_template_text).
    quant="q4" runs the block projections and the head on native kernels (forerun.kernels) as GGUF
    blocks: those of a GGUF of the types quant.GGUF_READERS lists read as stored, the others quantized
    into Q4_1 (projections) and Q8_0 (head); "auto" picks q4 for a GGUF of those types on the CPU in
    float32 (resolve_quant); "none" dequantizes."""
    from safetensors import safe_open

    from forerun.models.embedded import hub_gguf, resolve_model_dir
    from forerun.models.gguf import projection_blocks

    name = model
    model, revision = hub_gguf(model, revision)  # a GGUF named on the Hub: its file in the Hub's cache
    dtype = auto_dtype(dtype, device)
    if quant != "auto":  # checked before a GGUF conversion, which can take seconds
        quant = resolve_quant(quant, model, dtype, device)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    path = Path(resolve_model_dir(model, revision))
    if quant == "auto":
        quant = resolve_quant(quant, model, dtype, device, converted=path)
    config = json.loads((path / "config.json").read_text())
    if not native_arch(config):
        model_obj = _load_with_transformers(path, config, quant, torch_dtype, torch_device)
        return _runtime(model_obj, path, name or str(path), chat_template)
    args = ModelArgs.from_hf_config(config)
    files = weight_files(path)
    source = _gguf_source(model) if quant == "q4" else None
    weights: dict[str, torch.Tensor | QuantWeight] = {} if source is None else projection_blocks(source, config)
    for f in files:
        with safe_open(str(f), "pt") as tensors:
            weights.update({k: tensors.get_tensor(k) for k in tensors.keys() if k not in weights})
    return _runtime(build(args, weights, torch_dtype, torch_device, quant), path,
                    name or "SmolLM2-135M-Instruct (embedded)", chat_template)


def _runtime(model, path: Path, name: str, chat_template: str | None) -> Runtime:
    """The loaded model with the tokenizer and sampling defaults of its folder."""
    from forerun.models.tokenizer import Tokenizer, chat_template_text

    tokenizer = Tokenizer.from_dir(path)
    if chat_template is not None:
        tokenizer.use_chat_template(chat_template_text(chat_template))
    generation = path / "generation_config.json"
    defaults = json.loads(generation.read_text()) if generation.is_file() else {}
    return Runtime(model, tokenizer, name, GenerationDefaults.from_generation_config(defaults))


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of the checkpoint in `path`: the shards its index maps, else every
    *.safetensors file but Mistral's `consolidated` copy (the same weights under Mistral's own names,
    shipped beside the Hugging Face ones: read too, it would double the load for nothing)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} maps weights to {', '.join(missing)}, missing from {path}")
        return [path / name for name in names]
    files = [f for f in sorted(path.glob("*.safetensors")) if not f.name.startswith("consolidated")]
    if not files:
        raise FileNotFoundError(f"no Hugging Face *.safetensors weights in {path}")
    return files


def native_arch(config: dict) -> bool:
    return any(a in SUPPORTED_ARCHS for a in config.get("architectures") or [])


def _load_with_transformers(path: Path, config: dict, quant: str | None, dtype: torch.dtype,
                            device: torch.device):
    """A causal LM outside the native Llama family, run by transformers (forerun.models.hf_adapter)."""
    import warnings

    from forerun.models.hf_adapter import load_adapter

    archs = config.get("architectures") or ["(none given)"]
    if quant is not None:
        raise ValueError(f"quant {quant} needs the native runtime (Llama, Mistral, Qwen2/3), not {archs[0]}")
    warnings.warn(f"forerun: {archs[0]} is not in the native Llama family; running it through the slower "
                  "transformers adapter (no fused kernels, no layer-skip/del)", stacklevel=3)
    return load_adapter(str(path), dtype, device)

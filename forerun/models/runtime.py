"""A loaded model: weights on a device, its tokenizer, and the way it was loaded."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from forerun.models.args import SUPPORTED_ARCHS, ModelArgs
from forerun.models.llama import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    model: Transformer
    tokenizer: object | None  # forerun.models.tokenizer.Tokenizer; None for token-id-only use
    name: str

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
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


QUANTS = ("auto", "none", None, "q4")


def build(args: ModelArgs, weights: dict[str, torch.Tensor], dtype: torch.dtype,
          device: torch.device, quant: str | None = None) -> Transformer:
    weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
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
    whose block projections are Q4_1 (the embedded model is one), the model runs in float32 on the
    CPU, and the native kernels build. q4 stores exactly those blocks (re-quantizing the dequantized
    tensors recovers every one), so the file's own 4-bit model runs without a float detour.
    "none" (or None) always dequantizes; "q4" quantizes any float checkpoint (lossy)."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; use auto, q4 or none")
    if quant == "auto":
        if dtype != "float32" or device != "cpu" or not _q4_1_gguf(model, converted):
            return None
        from forerun import kernels

        return "q4" if kernels.cpu_kernels() is not None else None
    if quant == "q4" and (dtype != "float32" or device != "cpu"):
        raise ValueError("quant q4 runs 4-bit block weights with float32 activations on the CPU: "
                         "use --dtype float32 --device cpu")
    return "q4" if quant == "q4" else None


def _q4_1_gguf(model: str | None, converted: Path | None) -> bool:
    from forerun.models.embedded import embedded_gguf_path
    from forerun.models.gguf import projection_types

    try:
        source = embedded_gguf_path() if model is None else Path(model).expanduser()
    except FileNotFoundError:
        return False
    if source.suffix != ".gguf" or not source.is_file():
        return False
    return projection_types(source, converted) == {"Q4_1"}


def load(model: str | None = None, dtype: str = "float32", device: str = "cpu",
         quant: str | None = "auto") -> Runtime:
    """Load a model by HF directory, .gguf file, or None for the embedded SmolLM2-135M-Instruct.
    quant="q4" keeps the block projections in 4 bits and the head in 8 (groups of 32), as a
    Q4_1/Q8_0 GGUF has them, and runs them on native kernels (forerun.kernels); "auto" picks q4 for
    a Q4_1 GGUF on the CPU in float32 (resolve_quant); "none" dequantizes."""
    from safetensors.torch import load_file

    from forerun.models.embedded import resolve_model_dir
    from forerun.models.tokenizer import Tokenizer

    if quant != "auto":  # checked before a GGUF conversion, which can take seconds
        quant = resolve_quant(quant, model, dtype, device)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    path = Path(resolve_model_dir(model))
    if quant == "auto":
        quant = resolve_quant(quant, model, dtype, device, converted=path)
    config = json.loads((path / "config.json").read_text())
    if not native_arch(config):
        return _load_with_transformers(path, config, quant, torch_dtype, torch_device, model)
    args = ModelArgs.from_hf_config(config)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return Runtime(build(args, weights, torch_dtype, torch_device, quant), Tokenizer.from_dir(path),
                   name=model or "SmolLM2-135M-Instruct (embedded)")


def native_arch(config: dict) -> bool:
    return any(a in SUPPORTED_ARCHS for a in config.get("architectures") or [])


def _load_with_transformers(path: Path, config: dict, quant: str | None, dtype: torch.dtype,
                            device: torch.device, name: str | None) -> Runtime:
    """A causal LM outside the native Llama family, run by transformers (forerun.models.hf_adapter)."""
    import warnings

    from forerun.models.hf_adapter import load_adapter
    from forerun.models.tokenizer import Tokenizer

    archs = config.get("architectures") or ["(none given)"]
    if quant is not None:
        raise ValueError(f"quant {quant} needs the native runtime (Llama, Mistral, Qwen2/3), not {archs[0]}")
    warnings.warn(f"forerun: {archs[0]} is not in the native Llama family; running it through the slower "
                  "transformers adapter (no fused kernels, no layer-skip/del)", stacklevel=3)
    return Runtime(load_adapter(str(path), dtype, device), Tokenizer.from_dir(path), name=name or str(path))

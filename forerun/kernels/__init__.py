"""Native CPU kernels, compiled on first use with the system C++ compiler and cached by torch.

Everything here has a pure-PyTorch equivalent; a kernel that cannot be built (no compiler, a CPU
without AVX2, FORERUN_NO_KERNELS=1) leaves the caller on that slower path.
"""
from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch

_SOURCE = Path(__file__).with_name("cpu.cpp")


def for_tensor(x: torch.Tensor) -> ModuleType | None:
    """cpu_kernels() when they apply to x (float32 on the CPU), else None."""
    return cpu_kernels() if x.device.type == "cpu" and x.dtype == torch.float32 else None


def _cpu_has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _put_ninja_on_path() -> None:
    """torch builds extensions with `ninja` found on PATH; a virtual environment that was not
    activated has the `ninja` package's binary but not on PATH, so add its directory."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The float32 CPU kernels of cpu.cpp (quantized linears, decode attention, RMSNorm), or None
    where they cannot run."""
    if os.environ.get("FORERUN_NO_KERNELS") == "1" or not _cpu_has_avx2():
        return None
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    # -fopenmp: at::parallel_for is inline OpenMP code; the process shares the libgomp torch loaded.
    try:
        return load(name="forerun_cpu", sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, or a failed build: say so once and use the fallback
        warnings.warn(f"forerun: native CPU kernels unavailable ({str(exc).splitlines()[0]}); "
                      "q4 layers fall back to slow PyTorch code", stacklevel=2)
        return None

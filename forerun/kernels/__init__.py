"""Native CPU kernels, compiled on first use with the system C++ compiler and cached by torch.

Everything here has a pure-PyTorch equivalent; a kernel that cannot be built (no compiler, a CPU
without AVX2, FORERUN_NO_KERNELS=1) leaves the caller on that slower path.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sys
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


@contextlib.contextmanager
def _one_ninja():
    """While torch builds (or checks) the kernels, the `ninja` package's binary comes first on PATH.

    A machine often has two ninjas: the package's (a dependency of forerun) and a system one, and which
    PATH finds first depends on how a process was started (an activated virtual environment or not).
    Ninja 1.12 changed how its build log hashes commands, so two versions each take the other's build
    for a changed command and rebuild (about 35 s on 2 cores), every time the process kind alternates.
    One binary for every process keeps the build. Without the package, PATH's ninja is used."""
    try:
        import ninja
    except ImportError:
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, before] if before else [ninja.BIN_DIR])  # no "" (= cwd) entry
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def build_dir() -> Path:
    """Where torch builds and caches the kernels: TORCH_EXTENSIONS_DIR, else torch's own default."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        flavour = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        root = Path.home() / ".cache" / "torch_extensions" / f"py{sys.version_info.major}{sys.version_info.minor}_{flavour}"
    return Path(root) / "forerun_cpu"


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The float32 CPU kernels of cpu.cpp (quantized linears, decode attention, RMSNorm), or None
    where they cannot run."""
    if os.environ.get("FORERUN_NO_KERNELS") == "1" or not _cpu_has_avx2():
        return None
    from torch.utils.cpp_extension import load

    build = build_dir()
    try:
        build.mkdir(parents=True, exist_ok=True)
        with open(build / "forerun.flock", "w") as held, _one_ninja():
            # torch marks a build in progress with a plain `lock` file and waits, without end, for it
            # to go; a build that was killed leaves it behind and every later process hangs. An flock
            # is dropped by the kernel when its holder dies, and every forerun process takes this one
            # before building: while it is held, a `lock` file is one a dead process left.
            fcntl.flock(held, fcntl.LOCK_EX)
            (build / "lock").unlink(missing_ok=True)
            # -fopenmp: at::parallel_for is inline OpenMP code; the process shares torch's libgomp.
            return load(name="forerun_cpu", sources=[str(_SOURCE)], build_directory=str(build),
                        extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                        extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, or a failed build: say so once and use the fallback
        warnings.warn(f"forerun: native CPU kernels unavailable ({str(exc).splitlines()[0]}); "
                      "q4 layers fall back to slow PyTorch code", stacklevel=2)
        return None

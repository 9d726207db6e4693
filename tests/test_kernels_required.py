"""The native-kernel tests skip where the kernels cannot be built; on a machine that should build them
that skip would hide a broken build. .ci/run sets FORERUN_REQUIRE_KERNELS=1 where it finds a C++
compiler, and then a missing build fails here instead."""
import os

import pytest
import torch

from forerun import kernels


def test_native_kernels_are_built_where_required():
    if os.environ.get("FORERUN_REQUIRE_KERNELS") != "1":
        pytest.skip("FORERUN_REQUIRE_KERNELS is not set (.ci/run sets it where a C++ compiler is found)")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the native kernels need AVX2, which this CPU lacks")
    assert os.environ.get("FORERUN_NO_KERNELS") != "1", "FORERUN_NO_KERNELS=1 turns off the kernels required here"
    assert kernels.cpu_kernels() is not None, (
        "a C++ compiler is present but the native CPU kernels did not build; the reason is in the "
        "'native CPU kernels unavailable' warning of this run")

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


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_process(tmp_path, monkeypatch):
    """torch waits without end while its `lock` file exists; a build killed half-way (CI's time limit,
    an OOM kill, a restarted machine) leaves one, and before the fix every later process hung there."""
    from torch.utils import cpp_extension

    monkeypatch.delenv("FORERUN_NO_KERNELS", raising=False)
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the native kernels need AVX2, which this CPU lacks")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = kernels.build_dir()
    assert build == tmp_path / "forerun_cpu"
    build.mkdir()
    (build / "lock").touch()  # what a killed build leaves
    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs, lock_left=(build / "lock").exists())
        return "built"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert kernels.cpu_kernels.__wrapped__() == "built"
    assert seen["build_directory"] == str(build) and not seen["lock_left"]


def test_every_process_builds_with_the_same_ninja(tmp_path, monkeypatch):
    """A process started with a bare PATH (/usr/bin's ninja 1.11) and one in an activated environment
    (the `ninja` package's 1.13) each read the other's build log as a changed command and rebuilt the
    kernels, about 35 s every time the two alternated (the test suite's subprocesses did, a dozen
    times a run). The build now always runs the package's ninja, whatever PATH holds, and PATH is
    given back afterwards."""
    ninja = pytest.importorskip("ninja")
    import shutil

    from torch.utils import cpp_extension

    monkeypatch.delenv("FORERUN_NO_KERNELS", raising=False)
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the native kernels need AVX2, which this CPU lacks")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    seen = {}

    def fake_load(**kwargs):
        seen["ninja"] = shutil.which("ninja")
        return "built"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert kernels.cpu_kernels.__wrapped__() == "built"
    assert os.path.dirname(seen["ninja"]) == ninja.BIN_DIR
    assert os.environ["PATH"] == "/usr/bin:/bin"

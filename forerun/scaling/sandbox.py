"""Running untrusted code (model-written HumanEval completions) in a separate, limited process.

Each check gets a fresh temporary directory as its working directory (removed afterwards), its own
process with CPU-time, address-space, process-count, file-size and open-file rlimits, and a
wall-clock timeout after which its whole process group is killed. Where the kernel allows
unprivileged namespaces it also gets no network (a new network namespace), a read-only view of every
file system but its directory, and its own PID namespace (see sandbox_child.py). Where it does not,
the sandbox warns once, loudly, and falls back to a Python audit hook that refuses sockets and
writes outside the directory: a weaker guarantee (native code can get past an audit hook).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

_CHILD = Path(__file__).with_name("sandbox_child.py")
_warned = False


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 5
    wall_s: float = 10.0
    memory_bytes: int = 1 << 30  # address space; a Python interpreter needs ~100 MB of it
    processes: int = 32  # for the sandbox's user, where namespaces count its processes alone
    file_bytes: int = 1 << 20
    open_files: int = 64
    guard: bool = True  # the audit hook on top of the kernel's limits

    def __post_init__(self) -> None:
        if self.cpu_s < 1 or self.wall_s <= 0 or self.memory_bytes < 1 << 26:
            raise ValueError("sandbox limits need cpu_s >= 1, wall_s > 0 and memory_bytes >= 64 MiB")


@dataclass(frozen=True)
class Isolation:
    network: bool = False  # in a network namespace with no interface up
    filesystem: bool = False  # every mount but the working directory read-only
    pid: bool = False  # its own PID namespace
    processes: bool = False  # a process count the kernel enforces (a pids cgroup, or RLIMIT_NPROC for non-root)
    error: str | None = None
    writable_mounts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    status: str  # "passed", "failed" (non-zero exit), "timeout", or "error" (the sandbox itself failed)
    returncode: int | None
    stdout: str
    stderr: str
    isolation: Isolation

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(code: str, limits: Limits = Limits()) -> Result:
    """Run `code` as a Python program in the sandbox; it passes when it exits with status 0."""
    workdir = tempfile.mkdtemp(prefix="forerun-sandbox-")
    cgroup = _pids_cgroup(limits.processes)
    read_fd, write_fd = os.pipe()
    try:
        Path(workdir, "program.py").write_text(code)
        payload = json.dumps(asdict(limits) | {"cgroup_procs": str(cgroup / "cgroup.procs") if cgroup else None})
        cmd = [sys.executable, "-I", "-B", str(_CHILD), workdir, payload, str(write_fd)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                pass_fds=(write_fd,), start_new_session=True, cwd=workdir,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        os.close(write_fd)
        write_fd = -1
        try:
            out, err = proc.communicate(timeout=limits.wall_s)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            status = "timeout"
        isolation = _read_isolation(read_fd)
        if isolation is None:
            status = "error" if status != "timeout" else status
            isolation = Isolation(error="the sandbox's child reported nothing")
        _warn_if_weak(isolation)
        return Result(status, proc.returncode, _tail(out), _tail(err), isolation)
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
        _remove_cgroup(cgroup)


def _pids_cgroup(max_processes: int) -> Path | None:
    """A fresh pids cgroup (cgroup v1's pids hierarchy, or v2 where pids is enabled) limited to
    max_processes; None where this process may not make one."""
    for base in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        if not (base / "cgroup.procs").exists():
            continue
        try:
            path = Path(tempfile.mkdtemp(prefix="forerun-sandbox-", dir=base))
        except OSError:
            continue
        try:
            (path / "pids.max").write_text(str(max_processes))
            return path
        except OSError:
            _remove_cgroup(path)
    return None


def _remove_cgroup(path: Path | None) -> None:
    """rmdir the cgroup once its processes are gone (the PID namespace's end kills them)."""
    if path is None:
        return
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_isolation(fd: int) -> Isolation | None:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    if not data:
        return None
    fields = json.loads(data)
    return Isolation(fields["network"], fields["filesystem"], fields["pid"], fields["processes"], fields["error"],
                     fields["writable_mounts"])


def _warn_if_weak(isolation: Isolation) -> None:
    global _warned
    if _warned or (isolation.network and isolation.filesystem and isolation.processes):
        return
    _warned = True
    missing = [name for name in ("network", "filesystem", "processes") if not getattr(isolation, name)]
    why = isolation.error or ", ".join(isolation.writable_mounts) or "no pids cgroup, running as root"
    message = (f"SANDBOX IS WEAKER HERE: no kernel isolation of {', '.join(missing)} ({why}); "
               "untrusted code is held back there by rlimits and a Python audit hook only")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    print(f"forerun: warning: {message}", file=sys.stderr)


def _tail(data: bytes, limit: int = 4000) -> str:
    return data[-limit:].decode("utf-8", "replace")

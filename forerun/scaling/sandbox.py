"""Running untrusted code (model-written HumanEval completions) in a separate, limited process.

Each check gets a fresh temporary directory as its working directory (removed afterwards) and its own
process, isolated by the child itself before the code runs (see sandbox_child.py): rlimits, every
capability dropped, a seccomp filter (no new processes, no signals, no sockets...), a Python audit hook
and, where the kernel allows unprivileged namespaces, no network (a new network namespace), its own
PID namespace and a minimal root file system (the Python installation read-only, its directory
writable, nothing else of the host). Where it does not, the sandbox warns once, loudly: the audit hook
is then the only barrier to writing outside the directory, a weaker guarantee (native code can get past
an audit hook, though not past seccomp).

From this side: a cgroup per run where this process may make one (cgroup v2, or v1's pids and memory
hierarchies), which caps the sandbox's processes and its memory as a whole, and at the wall-clock limit
every process in it is killed (a new session or a namespace's PID 1 included), along with the child's
process group. Output is read as it arrives and only its tail kept, so a flood of it costs the host
nothing, and every read has a deadline: a process that holds a pipe open cannot hold up run_python.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
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
_TAIL_CHARS = 4000
_TAIL_BYTES = 4 * _TAIL_CHARS  # a UTF-8 character takes up to 4 bytes
_GRACE_S = 1.0  # after the kill, for the pipes to close and the child to be reaped
_warned = False


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 5
    wall_s: float = 10.0
    memory_bytes: int = 1 << 30  # each process's address space; a Python interpreter needs ~100 MB of it
    sandbox_memory_bytes: int = 1 << 30  # all of the sandbox's memory, where a memory cgroup can be made
    processes: int = 32  # threads included, where a pids cgroup (or a user namespace) counts them
    file_bytes: int = 1 << 20
    open_files: int = 64
    guard: bool = True  # the audit hook on top of the kernel's limits
    namespaces: bool = True  # False forces the fallback without namespaces (for tests)

    def __post_init__(self) -> None:
        if self.cpu_s < 1 or self.wall_s <= 0 or min(self.memory_bytes, self.sandbox_memory_bytes) < 1 << 26:
            raise ValueError("sandbox limits need cpu_s >= 1, wall_s > 0 and memory_bytes, sandbox_memory_bytes "
                             ">= 64 MiB")


@dataclass(frozen=True)
class Isolation:
    network: bool = False  # in a network namespace with no interface up
    filesystem: bool = False  # in a minimal root: the Python installation read-only, its directory writable
    pid: bool = False  # its own PID namespace, and a /proc that shows it alone
    processes: bool = False  # a cap on its threads the kernel enforces (a pids cgroup, RLIMIT_NPROC in its namespace)
    syscalls: bool = False  # the seccomp filter: no new processes at all, among others
    memory: bool = False  # a memory cgroup caps the whole sandbox
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


def run_python(code: str, limits: Limits = Limits(), must_reach_end: bool = False) -> Result:
    """Run `code` as a Python program in the sandbox; it passes when it exits with status 0, and with
    must_reach_end, only if it also ran to its end: an early exit with status 0 (os._exit(0), sys.exit(0),
    quit(), SystemExit) fails then (see sandbox_child.py for the proof and what it does not prove)."""
    sandbox_dir = tempfile.mkdtemp(prefix="forerun-sandbox-")
    workdir = os.path.join(sandbox_dir, "work")
    cgroups = _Cgroups(os.path.basename(sandbox_dir), limits)
    try:
        os.mkdir(workdir)
        os.mkdir(os.path.join(sandbox_dir, "root"))  # the mount point of the child's minimal root
        Path(workdir, "program.py").write_text(code)
        return _run(sandbox_dir, limits, cgroups, must_reach_end)
    finally:
        cgroups.kill()
        cgroups.remove()
        shutil.rmtree(sandbox_dir, ignore_errors=True)


def _run(sandbox_dir: str, limits: Limits, cgroups: _Cgroups, must_reach_end: bool) -> Result:
    nonce = secrets.token_hex(16)
    status_read, status_write = os.pipe()
    with open(status_read, "rb", buffering=0) as status:
        try:
            proc = _start_child(sandbox_dir, asdict(limits) | {"cgroup_procs": cgroups.procs_files}, status_write)
        finally:
            os.close(status_write)  # the child has its own copy
        with contextlib.suppress(BrokenPipeError), proc.stdin:  # the child may be gone already
            proc.stdin.write(nonce.encode())
        with proc.stdout, proc.stderr:
            pipes = _Pipes({"stdout": proc.stdout.fileno(), "stderr": proc.stderr.fileno(), "status": status.fileno()})
            finished = _wait(proc, pipes, limits.wall_s, cgroups)
    isolation = _isolation(pipes.data("status"), cgroups)
    stdout, reached_end = _without_proof(pipes.text("stdout"), nonce)
    if not finished:
        status = "timeout"
    elif isolation is None:
        status = "error"
    else:
        status = "passed" if proc.returncode == 0 and (reached_end or not must_reach_end) else "failed"
    isolation = isolation or Isolation(error="the sandbox's child reported nothing")
    if limits.namespaces:  # turned off on purpose, there is nothing to warn about
        _warn_if_weak(isolation)
    return Result(status, proc.returncode, stdout, pipes.text("stderr"), isolation)


def _start_child(sandbox_dir: str, settings: dict, status_fd: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-I", "-B", str(_CHILD), sandbox_dir, json.dumps(settings),
                             str(status_fd)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(status_fd,), start_new_session=True, cwd=os.path.join(sandbox_dir, "work"),
                            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})


def _wait(proc: subprocess.Popen, pipes: _Pipes, wall_s: float, cgroups: _Cgroups) -> bool:
    """Read the child's pipes until it ends (True) or until the wall-clock limit (False), when (as on any
    error here) every process of the sandbox is killed, and the pipes are read for a short grace only."""
    deadline = time.monotonic() + wall_s
    try:
        if pipes.read_until(deadline):
            _reaped(proc, deadline)
    finally:
        finished = proc.returncode is not None
        if not finished:
            _kill(proc, cgroups)
            grace = time.monotonic() + _GRACE_S
            pipes.read_until(grace)
            _reaped(proc, grace)
        pipes.close()
    return finished


class _Pipes:
    """Pipes from the child, by name, read as data arrives and with a deadline; of each only the tail is
    kept (the status report is far shorter)."""

    def __init__(self, fds: dict[str, int]):
        self._names = {fd: name for name, fd in fds.items()}
        self._data = {name: bytearray() for name in fds}
        self._selector = selectors.DefaultSelector()
        for fd in fds.values():
            self._selector.register(fd, selectors.EVENT_READ)

    def read_until(self, deadline: float) -> bool:
        """Read until every pipe is closed (True) or the deadline passes (False)."""
        while self._selector.get_map():
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return False
            for key, _ in self._selector.select(timeout):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    self._selector.unregister(key.fd)
                    continue
                data = self._data[self._names[key.fd]]
                data += chunk
                if len(data) > 2 * _TAIL_BYTES:
                    del data[:-_TAIL_BYTES]
        return True

    def data(self, name: str) -> bytes:
        return bytes(self._data[name][-_TAIL_BYTES:])

    def text(self, name: str) -> str:
        return self.data(name).decode("utf-8", "replace")[-_TAIL_CHARS:]

    def close(self) -> None:
        self._selector.close()


def _reaped(proc: subprocess.Popen, deadline: float) -> bool:
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        return True
    except subprocess.TimeoutExpired:
        return False


def _kill(proc: subprocess.Popen, cgroups: _Cgroups) -> None:
    """SIGKILL the child's process group, the child itself (in the fallback it runs the program, which may
    have left its group), and everything in its cgroups. In the namespaces the child's own child, PID 1,
    dies with it (its parent-death signal), and with PID 1 every process of the namespace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()
    cgroups.kill()


def _without_proof(stdout: str, nonce: str) -> tuple[str, bool]:
    """stdout without the nonce line the child writes after the program returns, and whether it was there."""
    proof = f"\n{nonce}\n"
    return stdout.replace(proof, "", 1), proof in stdout


def _isolation(report: bytes, cgroups: _Cgroups) -> Isolation | None:
    try:
        fields = json.loads(report)
    except ValueError:  # nothing: the child died before it could report
        return None
    joined = fields["cgroups_joined"]
    return Isolation(network=fields["network"], filesystem=fields["filesystem"], pid=fields["pid"],
                     processes=fields["pid"] or (joined and cgroups.caps_processes),
                     syscalls=fields["syscalls"], memory=joined and cgroups.caps_memory,
                     error="; ".join(fields["errors"]) or None, writable_mounts=fields["writable_mounts"])


class _Cgroups:
    """The run's own cgroups, made under this process's: a cgroup v2 one (its cgroup.kill ends every process
    in it at once, and it holds pids.max and memory.max where those controllers are enabled), else cgroup
    v1's pids and memory ones. Where this process may make none (not root, nothing delegated), the kernel
    caps neither the sandbox's total memory nor its threads, and the wall-clock kill relies on the process
    group and on the namespaces."""

    def __init__(self, name: str, limits: Limits):
        self.paths: list[Path] = []
        self.caps_processes = self.caps_memory = False
        homes = _own_cgroups()
        if "v2" in homes and (v2 := self._make(homes["v2"], name)):
            self.caps_processes = _write(v2 / "pids.max", limits.processes)
            self.caps_memory = _write(v2 / "memory.max", limits.sandbox_memory_bytes)
            _write(v2 / "memory.swap.max", 0)
        if not self.caps_processes and "pids" in homes:
            self.caps_processes = self._make_limited(homes["pids"], name, "pids.max", limits.processes)
        if not self.caps_memory and "memory" in homes:
            self.caps_memory = self._make_limited(homes["memory"], name, "memory.limit_in_bytes",
                                                  limits.sandbox_memory_bytes)
            if self.caps_memory:  # and no swap, where swap is counted (only once the limit above is set)
                _write(self.paths[-1] / "memory.memsw.limit_in_bytes", limits.sandbox_memory_bytes)

    @property
    def procs_files(self) -> list[str]:
        return [str(path / "cgroup.procs") for path in self.paths]

    def _make(self, home: Path, name: str) -> Path | None:
        try:
            (home / name).mkdir()
        except OSError:
            return None
        self.paths.append(home / name)
        return home / name

    def _make_limited(self, home: Path, name: str, limit_file: str, limit: int) -> bool:
        """A v1 cgroup, kept only where its limit could be set."""
        path = self._make(home, name)
        if path is None:
            return False
        if _write(path / limit_file, limit):
            return True
        self.paths.remove(path)
        path.rmdir()
        return False

    def kill(self) -> None:
        for path in self.paths:
            if not _write(path / "cgroup.kill", 1):
                _kill_members(path)

    def remove(self) -> None:
        """rmdir each cgroup once its processes are gone (a killed process leaves it within milliseconds)."""
        deadline = time.monotonic() + 2 * _GRACE_S
        for path in self.paths:
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    self.kill()
                    time.sleep(0.01)


def _own_cgroups() -> dict[str, Path]:
    """Where to make the run's cgroups, by hierarchy ("v2", "pids", "memory"), where mounted: under this
    process's own cgroup, or under the hierarchy's root where the own one is not visible (a container that
    shows its cgroups at the root) or, on cgroup v2, where the own one does not pass the pids controller
    down to its children and the root does."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else ["v2"]:
            own[controller] = path.lstrip("/")
    homes = {}
    for hierarchy, root in _cgroup_mounts().items():
        home = root / own.get(hierarchy, "")
        if not home.is_dir() or hierarchy == "v2" and not _passes_pids(home) and _passes_pids(root):
            home = root
        homes[hierarchy] = home
    return homes


def _cgroup_mounts() -> dict[str, Path]:
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount, _, fs = line.partition(" - ")
        point = Path(mount.split()[4].encode().decode("unicode_escape"))
        fstype, _, options = fs.split()[:3]
        if fstype == "cgroup2":
            mounts["v2"] = point
        elif fstype == "cgroup":
            mounts.update((h, point) for h in ("pids", "memory") if h in options.split(","))
    return mounts


def _passes_pids(cgroup: Path) -> bool:
    try:
        return "pids" in (cgroup / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False


def _write(path: Path, value: int) -> bool:
    try:
        path.write_text(str(value))
        return True
    except OSError:
        return False


def _members(cgroup: Path) -> set[int]:
    try:
        return {int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()}
    except OSError:
        return set()


def _kill_members(cgroup: Path) -> None:
    """SIGKILL every process listed in a cgroup without cgroup.kill (cgroup v1). Each is pinned by a pidfd and
    signalled only if still listed, so a pid reused by a process outside is never hit."""
    for pid in _members(cgroup):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if pid in _members(cgroup):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended in the meantime
        finally:
            os.close(pidfd)


def _warn_if_weak(isolation: Isolation) -> None:
    global _warned
    essential = ("network", "filesystem", "syscalls")
    if _warned or all(getattr(isolation, name) for name in essential):
        return
    _warned = True
    missing = [name for name in essential if not getattr(isolation, name)]
    why = isolation.error or ", ".join(f"{mount} stayed writable" for mount in isolation.writable_mounts)
    message = (f"SANDBOX IS WEAKER HERE: no kernel isolation of {', '.join(missing)} ({why}); "
               "untrusted code is held back there by the layers left (rlimits, seccomp where it was "
               "installed, a Python audit hook)")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    print(f"forerun: warning: {message}", file=sys.stderr)

"""The sandbox's child: run as `python -I -B sandbox_child.py WORKDIR LIMITS_JSON STATUS_FD`.

It isolates itself before any untrusted code runs, reports on STATUS_FD what it achieved, then runs
WORKDIR/program.py with WORKDIR as its working directory:

1. new user, mount, network and PID namespaces (where the kernel allows unprivileged ones): no
   network interface but a downed loopback; a fork makes the program PID 1 of its namespace, so when
   it ends (or is killed) the kernel kills every process it started;
2. every mount read-only except a bind mount of WORKDIR; then every capability is dropped (the
   namespace granted them), with no_new_privs, so the program cannot remount anything writable;
3. a pids cgroup made by the parent, where it can make one, caps the process count (RLIMIT_NPROC
   does not bind root); rlimits: CPU seconds, address space, processes, file size, open files, no
   core dumps;
4. a Python audit hook that refuses process creation, shell commands and calls into native code
   through ctypes, and, where step 1 or 2 failed, network sockets and writes outside WORKDIR (audit
   hooks cannot be removed from Python).
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x10000000, 0x40000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, _LINUX_CAPABILITY_VERSION_3 = 38, 24, 0x20080522
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
_ST_TO_MS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME, 4096: MS_RELATIME}

_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def _mount(source, target, flags: int) -> None:
    if _libc.mount(source and source.encode(), target.encode(), None, flags, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def _drop_capabilities() -> None:
    """Give up every capability (the new user namespace granted them all, CAP_SYS_ADMIN included,
    which could remount the file systems writable) and the means to gain any back."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    for cap in range(64):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # beyond the last capability this fails harmlessly
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable for two 32-bit words: all zero
    if _libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), f"capset: {os.strerror(ctypes.get_errno())}")


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return list(dict.fromkeys(points))


def _read_only_except(workdir: str) -> list[str]:
    """Remount everything read-only but a bind of workdir; returns the mounts that stayed writable."""
    _mount(None, "/", MS_REC | MS_PRIVATE)
    _mount(workdir, workdir, MS_BIND | MS_REC)
    writable = []
    for point in _mount_points():
        if point == workdir:
            continue
        try:
            kept = sum(ms for st, ms in _ST_TO_MS.items() if os.statvfs(point).f_flag & st)
            _mount(None, point, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
        except OSError:
            if os.access(point, os.W_OK):
                writable.append(point)
    return writable


def join_cgroup(procs_file: str | None) -> bool:
    """Enter the pids cgroup the parent made (its pids.max caps processes even for root, whom
    RLIMIT_NPROC exempts)."""
    if not procs_file:
        return os.geteuid() != 0
    try:
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))
        return True
    except OSError:
        return os.geteuid() != 0


def isolate(workdir: str, procs_file: str | None) -> dict:
    status = {"network": False, "filesystem": False, "pid": False, "processes": join_cgroup(procs_file),
              "writable_mounts": [], "error": None}
    try:
        _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)
        status["network"] = True
        status["writable_mounts"] = _read_only_except(workdir)
        _drop_capabilities()
        status["filesystem"] = not status["writable_mounts"]
        status["pid"] = True
    except OSError as e:
        status["error"] = str(e)
    return status


def set_limits(limits: dict) -> None:
    for name, value in (("RLIMIT_CPU", limits["cpu_s"]), ("RLIMIT_AS", limits["memory_bytes"]),
                        ("RLIMIT_NPROC", limits["processes"]), ("RLIMIT_FSIZE", limits["file_bytes"]),
                        ("RLIMIT_NOFILE", limits["open_files"]), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


# Process creation, signals, and every way into native code through ctypes (loading a library, looking
# up a symbol, calling a function pointer): the sandbox's own ctypes calls are all made before the hook.
_REFUSED_EVENTS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
                   "pty.spawn", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle",
                   "ctypes.call_function")


def install_guard(workdir: str, status: dict) -> None:
    """Refuse from Python what the kernel layers may not stop (sockets and outside writes only where
    they did not)."""
    block_net, block_fs = not status["network"], not status["filesystem"]
    root = os.path.realpath(workdir) + os.sep

    def hook(event: str, args: tuple) -> None:
        if event in _REFUSED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if block_net and event in ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo"):
            raise PermissionError(f"sandbox: no network ({event})")
        if block_fs and event == "open" and isinstance(args[0], (str, bytes)):
            mode, flags = args[1], args[2]
            writes = (mode and any(c in str(mode) for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR)
            path = os.path.realpath(os.fsdecode(args[0]))
            if writes and not (path + os.sep).startswith(root):
                raise PermissionError(f"sandbox: writing {path} is outside the sandbox")
        if block_fs and event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.chmod"):
            path = os.path.realpath(os.fsdecode(args[0])) if args and isinstance(args[0], (str, bytes)) else ""
            if not (path + os.sep).startswith(root):
                raise PermissionError(f"sandbox: {event} outside the sandbox")

    sys.addaudithook(hook)


def main() -> int:
    workdir, limits, status_fd = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    status = isolate(workdir, limits["cgroup_procs"])
    if status["pid"]:
        pid = os.fork()  # the child is PID 1 of the new namespace
        if pid:
            os.close(status_fd)
            _, code = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(code)
    os.write(status_fd, json.dumps(status).encode())
    os.close(status_fd)
    os.chdir(workdir)
    set_limits(limits)
    if limits["guard"]:
        install_guard(workdir, status)
    sys.path.insert(0, workdir)
    with open(os.path.join(workdir, "program.py")) as f:
        code = compile(f.read(), "program.py", "exec")
    exec(code, {"__name__": "__main__"})
    return 0


if __name__ == "__main__":
    sys.exit(main())

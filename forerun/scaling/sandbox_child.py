"""The sandbox's child: run as `python -I -B sandbox_child.py SANDBOX_DIR SETTINGS_JSON STATUS_FD`, with a
nonce on stdin.

It isolates itself before any untrusted code runs, reports on STATUS_FD what it achieved, then runs
SANDBOX_DIR/work/program.py with that directory as its working directory:

1. it joins the cgroups the parent made: they cap its threads and its memory, and let the parent
   kill every process in the sandbox at once;
2. new user, mount, network and PID namespaces (where the kernel allows unprivileged ones, and unless
   the settings turn them off): no network interface but a downed loopback; a fork makes the program
   PID 1 of its namespace, so when it ends (or is killed, or its parent is) the kernel kills every
   process it started;
3. a minimal root file system (pivot_root): the Python installation and the system libraries
   read-only, a few device nodes, a fresh /proc that shows the sandbox's own processes only, and the
   working directory (writable, noexec). Nothing else of the host is there: no /tmp, /run, /var,
   /home or /sys, hence no host Unix-domain socket to connect to (a read-only mount does not stop
   connect() on a socket file) and no other process's command line;
4. rlimits: CPU seconds, address space, file size, open files, no core dumps, and in its own user
   namespace processes; then every capability is dropped, with no_new_privs, in every mode (root
   without namespaces gives up CAP_KILL, CAP_DAC_OVERRIDE, CAP_SYS_ADMIN...), so nothing can be
   remounted writable;
5. a seccomp filter, in every mode: no new processes (threads only), no signals to any process, no
   sockets (socketpair() still works), no device nodes or FIFOs, no mounts or namespaces, nothing
   that reaches into another process (ptrace, its memory, scheduling, limits), no keyrings, bpf,
   perf events, userfaultfd or io_uring;
6. a Python audit hook (unless the settings turn it off) that refuses the same from Python with
   readable errors, and what seccomp cannot judge: writes outside the working directory (every
   event that changes a path, both paths of a rename or link, file descriptors and dir_fds resolved,
   '..' refused), opening a directory outside it, other processes' /proc entries, network calls,
   ctypes, and loading native modules that start processes or call native code, or any from the
   working directory. Where steps 2-3 failed it is the only barrier to writing outside, and native
   code gets past an audit hook: crafted bytecode, or a module spec whose origin names an installed
   module to the hook and then a file the program wrote to the loader. Seccomp still holds there.

After the program returns (not when it exits, however it exits), the child writes the nonce as a line
of its own on stdout: the parent's proof that the program ran to its end. The program does not get
the nonce (it is read from stdin before the program runs, and stdin is then /dev/null), but one that
searches its own process's memory for it could print it: the proof tells an early exit (os._exit(0),
sys.exit(0), quit()) from a finished program, it is no defence against a program built to forge it.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x20000, 0x10000000, 0x40000000, 0x20000000
CLONE_THREAD = 0x10000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
_ST_TO_MS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME, 4096: MS_RELATIME}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_SECCOMP = 1, 38, 24, 22
_LINUX_CAPABILITY_VERSION_3, SECCOMP_MODE_FILTER = 0x20080522, 2

# What the new root holds besides the Python installation and the working directory.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")
_DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, flags: int, fstype: str | None = None, data: str | None = None) -> None:
    source_b, target_b, fstype_b, data_b = (s.encode() if s else None for s in (source, target, fstype, data))
    _check(_libc.mount(source_b, target_b, fstype_b, flags, data_b), f"mount {target}")


def join_cgroups(procs_files: list[str]) -> bool:
    """Enter the cgroups the parent made; False if one refused this process."""
    try:
        for procs_file in procs_files:
            with open(procs_file, "w") as f:
                f.write(str(os.getpid()))
        return True
    except OSError:
        return False


def unshare_namespaces() -> None:
    """New user, mount, network and PID namespaces (the PID one for this process's next child), with
    this process's user and group mapped to themselves, so that it can make files on a tmpfs of its own."""
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def die_with_parent() -> None:
    """SIGKILL when the parent dies: the parent is what the sandbox kills at the wall-clock limit, and
    as PID 1 this process takes every process of its namespace with it."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def _within(path: str, trees: list[str]) -> bool:
    return any(path == tree or path.startswith(tree.rstrip("/") + "/") for tree in trees)


def _bind(root: str, path: str, visible: list[str]) -> None:
    """Make the host's `path` visible at the same place under `root`: a bind mount of the tree it resolves
    to (unless one is there already), and where `path` itself goes through a symlink, a symlink to it."""
    if not os.path.lexists(path) or _within(path, visible):
        return
    real = os.path.realpath(path)
    if not _within(real, visible):
        target = root + real
        if os.path.isdir(real):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "x").close()
        _mount(real, target, MS_BIND | MS_REC)
        visible.append(real)
    if real != path:
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        os.symlink(real, root + path)
        visible.append(path)


def _python_trees() -> list[str]:
    """The interpreter's installation (a virtualenv and the Python it was made from)."""
    return sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix} - {"/"})


def _devices(root: str) -> None:
    os.mkdir(root + "/dev")
    for name in _DEVICES:
        open(f"{root}/dev/{name}", "x").close()
        _mount(f"/dev/{name}", f"{root}/dev/{name}", MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")


def _proc(root: str) -> None:
    """A fresh procfs, of this PID namespace: where the kernel refuses one (it does while the host's
    /proc is partly covered, as in some containers), /proc stays an empty directory."""
    os.mkdir(root + "/proc")
    try:
        _mount("proc", root + "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "proc")
    except OSError:
        pass


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return list(dict.fromkeys(points))


def _lock_down(root: str, workdir: str) -> list[str]:
    """Remount every mount under root read-only, but the working directory (noexec: no native code from
    it); returns the mounts that stayed writable. A remount must keep the flags the kernel locked (nosuid,
    nodev, ...) on mounts that came from the host, or it is refused."""
    writable = []
    for point in _mount_points():
        if not _within(point, [root]):
            continue
        kept = sum(ms for st, ms in _ST_TO_MS.items() if os.statvfs(point).f_flag & st)
        extra = MS_NOEXEC | MS_NOSUID | MS_NODEV if point == root + workdir else MS_RDONLY
        try:
            _mount(None, point, MS_REMOUNT | MS_BIND | kept | extra)
        except OSError:
            if os.access(point, os.W_OK):
                writable.append(point[len(root):] or "/")
    return writable


def _pivot_root(root: str) -> None:
    """Make root the root directory and detach the host's tree: pivot_root(".", ".") stacks the old root
    on top of the new one, and the lazy unmount takes it away."""
    os.chdir(root)
    _check(_libc.syscall(_syscall_numbers()["pivot_root"], b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount the host's root")
    os.chdir("/")


def build_root(sandbox_dir: str, workdir: str) -> list[str]:
    """Build the minimal root in SANDBOX_DIR/root (a tmpfs) and move into it; returns the mounts that
    stayed writable besides the working directory."""
    sandbox_dir, workdir = os.path.realpath(sandbox_dir), os.path.realpath(workdir)
    root = os.path.join(sandbox_dir, "root")
    _mount(None, "/", MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, MS_NOSUID | MS_NODEV, "tmpfs", "mode=0755,size=1m")
    visible: list[str] = []
    for path in (*_SYSTEM_PATHS, *_python_trees()):
        _bind(root, path, visible)
    os.makedirs(root + workdir)
    _mount(workdir, root + workdir, MS_BIND)
    _devices(root)
    _proc(root)
    writable = _lock_down(root, workdir)
    _pivot_root(root)
    return writable


def set_limits(settings: dict, own_user_namespace: bool) -> None:
    """RLIMIT_NPROC counts every process of the user in its user namespace: in the host's, a root sandbox
    without capabilities would count the host's processes and could not even start a thread."""
    limits = [("RLIMIT_CPU", settings["cpu_s"]), ("RLIMIT_AS", settings["memory_bytes"]),
              ("RLIMIT_FSIZE", settings["file_bytes"]), ("RLIMIT_NOFILE", settings["open_files"]), ("RLIMIT_CORE", 0)]
    if own_user_namespace:
        limits.append(("RLIMIT_NPROC", settings["processes"]))
    for name, value in limits:
        resource.setrlimit(getattr(resource, name), (value, value))


def drop_capabilities() -> None:
    """Give up every capability (a new user namespace grants them all, CAP_SYS_ADMIN included, which could
    remount the file systems writable; root has them all anyway) and the means to gain any back."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    for cap in range(64):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # beyond the last capability this fails harmlessly
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable for two 32-bit words: all zero
    _check(_libc.capset(header, data), "capset")


# seccomp: syscall numbers on x86_64 and aarch64 (None: the architecture has no such call)
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {
    "clone": (56, 220), "clone3": (435, 435), "fork": (57, None), "vfork": (58, None), "execve": (59, 221),
    "execveat": (322, 281), "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131),
    "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240), "pidfd_open": (434, 434),
    "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438), "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "process_madvise": (440, 440),
    "kcmp": (312, 272), "setpriority": (141, 140), "sched_setparam": (142, 118), "sched_setscheduler": (144, 119),
    "sched_setaffinity": (203, 122), "sched_setattr": (314, 274), "ioprio_set": (251, 30),
    "migrate_pages": (256, 238), "move_pages": (279, 239), "prlimit64": (302, 261), "socket": (41, 198),
    "mknod": (133, None), "mknodat": (259, 33), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "unshare": (272, 97), "setns": (308, 268), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "mount_setattr": (442, 442), "add_key": (248, 217), "request_key": (249, 218),
    "keyctl": (250, 219), "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "fcntl": (72, 25), "ioctl": (16, 29),
}
_ALWAYS_REFUSED = [name for name in _SYSCALLS if name not in ("clone", "clone3", "prlimit64", "fcntl", "ioctl")]
F_SETOWN, F_SETOWN_EX, FIOSETOWN, SIOCSPGRP = 8, 15, 0x8901, 0x8902  # whom SIGIO goes to: any process of our uid
_X32_SYSCALL_BIT = 0x40000000
EPERM, ENOSYS = 1, 38
BPF_LD_ABS, BPF_JEQ, BPF_JGE, BPF_JSET, BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
RET_KILL_PROCESS, RET_ALLOW, RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
_NR, _ARCH, _ARGS = 0, 4, 16  # offsets in struct seccomp_data; an argument's low 32 bits on little-endian


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _syscall_numbers() -> dict[str, int]:
    machine = os.uname().machine
    if machine not in _AUDIT_ARCH:
        raise OSError(ENOSYS, f"no syscall table for {machine}")
    column = list(_AUDIT_ARCH).index(machine)
    return {name: numbers[column] for name, numbers in _SYSCALLS.items() if numbers[column] is not None}


def _refuse(errno: int = EPERM) -> tuple:
    return (BPF_RET, 0, 0, RET_ERRNO | errno)


def _unless_argument(nr: int, arg: int, test: int, value: int) -> list[tuple]:
    """Syscall nr is refused unless its argument passes the test (BPF_JEQ or BPF_JSET against value)."""
    return [(BPF_JEQ, 0, 4, nr), (BPF_LD_ABS, 0, 0, _ARGS + 8 * arg), (test, 1, 0, value), _refuse(),
            (BPF_RET, 0, 0, RET_ALLOW)]


def _if_argument_in(nr: int, arg: int, values: tuple[int, ...]) -> list[tuple]:
    """Syscall nr is refused when its argument is one of values."""
    n = len(values)
    return [(BPF_JEQ, 0, n + 3, nr), (BPF_LD_ABS, 0, 0, _ARGS + 8 * arg),
            *[(BPF_JEQ, n - i, 0, value) for i, value in enumerate(values)], (BPF_RET, 0, 0, RET_ALLOW), _refuse()]


def seccomp_program() -> list[tuple]:
    """The filter, as BPF (code, jt, jf, k) instructions. Each check either returns or falls through with
    the syscall number still loaded."""
    machine, nr = os.uname().machine, _syscall_numbers()
    program = [(BPF_LD_ABS, 0, 0, _ARCH), (BPF_JEQ, 1, 0, _AUDIT_ARCH[machine]), (BPF_RET, 0, 0, RET_KILL_PROCESS),
               (BPF_LD_ABS, 0, 0, _NR)]
    if machine == "x86_64":  # the x32 ABI's numbers would dodge every check below
        program += [(BPF_JGE, 0, 1, _X32_SYSCALL_BIT), _refuse()]
    program += [(BPF_JEQ, 0, 1, nr["clone3"]), _refuse(ENOSYS)]  # its flags are out of reach: glibc falls back to clone
    program += _unless_argument(nr["clone"], 0, BPF_JSET, CLONE_THREAD)  # threads, not processes
    program += _unless_argument(nr["prlimit64"], 0, BPF_JEQ, 0)  # its own limits only
    program += _if_argument_in(nr["fcntl"], 1, (F_SETOWN, F_SETOWN_EX))
    program += _if_argument_in(nr["ioctl"], 1, (FIOSETOWN, SIOCSPGRP))
    for name in _ALWAYS_REFUSED:
        if name in nr:
            program += [(BPF_JEQ, 0, 1, nr[name]), _refuse()]
    return program + [(BPF_RET, 0, 0, RET_ALLOW)]


def install_seccomp() -> None:
    instructions = seccomp_program()
    filters = (_SockFilter * len(instructions))(*[_SockFilter(*i) for i in instructions])
    program = _SockFprog(len(instructions), filters)
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0), "seccomp")


# Audit events refused outright: process creation, signals, native code, network calls.
_REFUSED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.startfile", "subprocess.Popen",
    "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "sqlite3.enable_load_extension",
    "sqlite3.load_extension"})
_REFUSED_PREFIXES = ("ctypes.", "socket.")  # every ctypes event, and every socket call but socket creation
# Native modules that start processes or call arbitrary native code
_NATIVE_MODULES = frozenset({"_posixsubprocess", "_ctypes", "ctypes", "_cffi_backend", "_testcapi",
                             "_testinternalcapi"})
# Events that change paths: for each path (or file descriptor) one changes, its position in the event's arguments
# and that of the dir_fd it is relative to (the event gives -1 for none).
_WRITES = {
    "os.truncate": ((0, None),), "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)),
    "os.symlink": ((1, 2),), "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.chflags": ((0, None),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "os.lockf": ((0, None),),
    "fcntl.flock": ((0, None),), "fcntl.lockf": ((0, None),),
}
_DISCARDING_DEVICES = ("/dev/null", "/dev/zero", "/dev/full")  # writable by anyone, and nothing is kept
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _plain(value) -> str | int:
    """A path (or file descriptor) argument as the call itself used it: an exact str (bytes decoded) or int.
    A subclass's methods could answer the hook otherwise than the call saw it, and a path object could change
    in between (another thread), so anything else is refused."""
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes):
        return os.fsdecode(bytes.__bytes__(value))
    raise PermissionError(f"sandbox: a path must be a str, bytes or a file descriptor, not {type(value).__name__}")


class Guard:
    """The audit hook. Paths are judged as the kernel will see them: relative ones against the working
    directory (it may not leave it) or the dir_fd, both lexically and with symlinks resolved; '..' is
    refused outright, since a symlink swapped for a directory between the check and the call would
    change where it leads. Symlinks may only point down (relative, no '..'), so none leads out."""

    def __init__(self, workdir: str):
        self.roots = [workdir, os.path.realpath(workdir)]
        self.own_proc = f"/proc/{os.getpid()}"

    def __call__(self, event: str, args: tuple) -> None:
        if event in _REFUSED_EVENTS or event.startswith(_REFUSED_PREFIXES) and event != "socket.__new__":
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            self._check_import(_plain(args[0]), args[1])
        elif event == "open":
            self._check_open(_plain(args[0]), _plain(args[2] or 0))
        elif event in _WRITES:
            for path, dir_fd in _WRITES[event]:
                fd = None if dir_fd is None else _plain(args[dir_fd])
                self._check_write(_plain(args[path]), None if fd == -1 else fd, event)
            if event == "os.symlink":
                self._check_link_text(_plain(args[0]))
        elif event == "os.chdir":
            self._check_write(_plain(args[0]), None, "changing directory to")
        elif event in ("os.listdir", "os.scandir") and isinstance(args[0], (str, bytes)):
            self._check_proc(os.path.realpath(_plain(args[0])))
        elif event == "resource.prlimit" and _plain(args[0]) not in (0, os.getpid()):
            raise PermissionError("sandbox: another process's limits are not its business")

    def _inside(self, path: str) -> bool:
        return _within(path, self.roots)

    def _check_import(self, name: str, filename) -> None:
        if name in _NATIVE_MODULES or (filename is not None and self._inside(os.path.realpath(_plain(filename)))):
            raise ImportError(f"sandbox: importing {name} is not allowed")

    def _check_open(self, path: str | int, flags: int) -> None:
        if isinstance(path, int):
            return  # a file descriptor it already has
        if flags & _WRITE_FLAGS:
            return self._check_write(path, None, "writing")
        real = self._absolute(path, None, "opening")[1]
        self._check_proc(real)
        if os.path.isdir(real) and not self._inside(real):  # a dir_fd outside would let os.open write there
            raise PermissionError(f"sandbox: opening directory {real} is outside the sandbox")

    def _check_write(self, path: str | int, dir_fd: int | None, what: str) -> None:
        if isinstance(path, int):
            path, dir_fd = os.readlink(f"/proc/self/fd/{path}"), None
            if not path.startswith("/"):
                return  # a pipe, a socket, an anonymous inode: no path to protect
        lexical, real = self._absolute(path, dir_fd, what)
        if real in _DISCARDING_DEVICES:
            return
        if not (self._inside(lexical) and self._inside(real)):
            raise PermissionError(f"sandbox: {what} {real} is outside the sandbox")

    def _absolute(self, path: str, dir_fd: int | None, what: str) -> tuple[str, str]:
        """The path made absolute, lexically and with symlinks resolved."""
        if ".." in path.split(os.sep):
            raise PermissionError(f"sandbox: '..' in {path} ({what})")
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
        lexical = os.path.normpath(os.path.join(base, path))
        return lexical, os.path.realpath(lexical)

    def _check_link_text(self, text: str) -> None:
        if os.path.isabs(text) or ".." in text.split(os.sep):
            raise PermissionError(f"sandbox: a symlink to {text} could lead outside the sandbox")

    def _check_proc(self, real: str) -> None:
        parts = real.split(os.sep)
        if real.startswith("/proc/") and parts[2].isdigit() and not _within(real, [self.own_proc]):
            raise PermissionError(f"sandbox: {real} belongs to another process")


def install_guard(workdir: str) -> None:
    """Audit hooks cannot be removed from Python. ctypes goes out of sys.modules (the child itself used
    it), so that importing it raises an import event the hook refuses."""
    for name in [name for name in sys.modules if name.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]
    sys.addaudithook(Guard(workdir))


def _unshared(status: dict) -> bool:
    try:
        unshare_namespaces()
    except OSError as e:
        status["errors"].append(str(e))
        return False
    status["network"] = status["pid"] = True
    return True


def _build_view(sandbox_dir: str, workdir: str, status: dict) -> None:
    """Step 3, in PID 1 of the new namespace (a procfs shows the PID namespace of whoever mounts it)."""
    try:
        die_with_parent()
        status["writable_mounts"] = build_root(sandbox_dir, workdir)
        status["filesystem"] = not status["writable_mounts"]
    except OSError as e:
        status["errors"].append(str(e))


def _restrict(settings: dict, status: dict) -> None:
    """Steps 4 and 5."""
    set_limits(settings, own_user_namespace=status["pid"])
    try:
        drop_capabilities()
        install_seccomp()
        status["syscalls"] = True
    except OSError as e:
        status["errors"].append(str(e))


def _take_nonce() -> bytes:
    nonce = b""
    while chunk := os.read(0, 4096):
        nonce += chunk
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return nonce


def run_program(workdir: str, guard: bool, nonce: bytes) -> int:
    os.chdir(workdir)
    sys.path.insert(0, workdir)
    with open("program.py") as f:
        code = compile(f.read(), "program.py", "exec")
    if guard:
        install_guard(workdir)
    exec(code, {"__name__": "__main__"})
    for stream in (sys.stdout, sys.__stdout__):  # its output first: the nonce must come after it
        stream.flush()
    os.write(1, b"\n" + nonce + b"\n")
    return 0


def main() -> int:
    sandbox_dir, settings, status_fd = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    workdir = os.path.realpath(os.path.join(sandbox_dir, "work"))
    nonce = _take_nonce()
    status = {"network": False, "filesystem": False, "pid": False, "syscalls": False, "writable_mounts": [],
              "errors": [], "cgroups_joined": join_cgroups(settings["cgroup_procs"])}
    if settings["namespaces"] and _unshared(status):
        pid = os.fork()  # the child is PID 1 of the new PID namespace
        if pid:
            os.close(status_fd)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        _build_view(sandbox_dir, workdir, status)
    _restrict(settings, status)
    os.write(status_fd, json.dumps(status).encode())
    os.close(status_fd)
    return run_program(workdir, settings["guard"], nonce)


if __name__ == "__main__":
    sys.exit(main())

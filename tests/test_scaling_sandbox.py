"""The sandbox holds hostile code: each case is contained (no effect outside) and reported failed.

With the default limits (kernel isolation where available, plus the audit-hook guard), and, where the
kernel grants namespaces and a pids cgroup, with the guard off: the kernel layer alone must hold."""
import os
import time
import uuid

import pytest

from forerun.scaling.sandbox import Limits, run_python

FAST = Limits(cpu_s=2, wall_s=6)


def _outside() -> str:
    return f"/tmp/forerun-sandbox-escape-{uuid.uuid4().hex}"


def _kernel_isolation() -> bool:
    iso = run_python("pass", FAST).isolation
    return iso.network and iso.filesystem and iso.pid and iso.processes


KERNEL = pytest.mark.skipif(not _kernel_isolation(), reason="the kernel grants no namespaces or pids cgroup here")


@pytest.fixture(params=["guarded", "kernel-only"])
def limits(request):
    if request.param == "guarded":
        return FAST
    if not _kernel_isolation():
        pytest.skip("the kernel grants no namespaces or pids cgroup here: the guard is the only layer")
    return Limits(cpu_s=2, wall_s=6, guard=False)


def test_a_correct_program_passes_and_sees_its_own_directory():
    r = run_python("import os\nopen('x.txt', 'w').write('hi')\nprint(open('x.txt').read(), os.listdir('.'))", FAST)
    assert r.passed, r.stderr
    assert "hi" in r.stdout and "program.py" in r.stdout


def test_an_exception_fails():
    r = run_python("assert 1 == 2", FAST)
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_infinite_loop_is_stopped(limits):
    start = time.perf_counter()
    r = run_python("while True:\n    pass\n", limits)
    assert not r.passed and r.status in ("failed", "timeout")
    assert time.perf_counter() - start < limits.wall_s + 3


def test_sleeping_forever_hits_the_wall_clock(limits):
    r = run_python("import time\ntime.sleep(60)\n", Limits(cpu_s=2, wall_s=1.5, guard=limits.guard))
    assert r.status == "timeout"


def test_fork_bomb_is_contained(limits):
    # bounded, so that a broken sandbox cannot take the machine down with it
    code = ("import os, time\nfor _ in range(300):\n"
            "    if os.fork() == 0:\n        time.sleep(30)\n        os._exit(0)\n")
    start = time.perf_counter()
    r = run_python(code, limits)
    assert r.status == "failed", (r.status, r.stderr)
    assert ("BlockingIOError" in r.stderr) or ("not allowed" in r.stderr)
    assert time.perf_counter() - start < 10


def test_memory_hog_fails(limits):
    r = run_python("x = bytearray(4 * 1024 ** 3)\nprint('allocated')\n", limits)
    assert r.status == "failed" and "MemoryError" in r.stderr and "allocated" not in r.stdout


def test_writing_outside_its_directory_is_refused(limits):
    for target in (_outside(), "/dev/shm/" + os.path.basename(_outside())):
        r = run_python(f"open({target!r}, 'w').write('escaped')\n", limits)
        assert r.status == "failed"
        assert not os.path.exists(target)


def test_a_big_file_inside_is_cut_by_the_file_size_limit(limits):
    r = run_python("open('big', 'wb').write(b'x' * (8 << 20))\n", Limits(cpu_s=2, wall_s=6, file_bytes=1 << 20,
                                                                          guard=limits.guard))
    assert r.status == "failed"


def test_socket_connect_fails(limits):
    code = "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\nprint('connected')\n"
    r = run_python(code, limits)
    assert r.status == "failed" and "connected" not in r.stdout


def test_os_system_cannot_touch_the_outside():
    target = _outside()
    r = run_python(f"import os\nassert os.system('touch {target}') == 0\n", FAST)
    assert r.status == "failed" and "not allowed" in r.stderr
    assert not os.path.exists(target)


@KERNEL
def test_without_the_guard_shell_commands_still_cannot_write_outside():
    target = _outside()
    r = run_python(f"import os\nassert os.system('touch {target}') == 0\n", Limits(cpu_s=2, wall_s=6, guard=False))
    assert r.status == "failed"
    assert not os.path.exists(target)


REMOUNT = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
           "assert libc.mount(None, b'/', None, 32 | 4096, None) == 0, ctypes.get_errno()\n")


def test_the_guard_refuses_native_calls_through_ctypes():
    r = run_python(REMOUNT, FAST)
    assert r.status == "failed" and "ctypes.dlopen is not allowed" in r.stderr


@KERNEL
def test_the_program_cannot_remount_the_file_system_writable():
    r = run_python(REMOUNT, Limits(cpu_s=2, wall_s=6, guard=False))
    assert r.status == "failed" and "AssertionError" in r.stderr  # mount() returned -1 (EPERM)


def test_its_directory_is_removed_afterwards():
    r = run_python("import os\nprint(os.getcwd())\n", FAST)
    assert r.passed and not os.path.exists(r.stdout.strip())


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="sandbox limits"):
        Limits(cpu_s=0)

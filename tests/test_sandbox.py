"""The code sandbox contains hostile programs and reports what they did."""

import os
import secrets
import socket
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kat_core.errors import KatError
from kat_core.tasks.confinement import SECCOMP
from kat_core.tasks.sandbox import configure, isolation, run_python, run_tests

PROJECT_ROOT = Path(__file__).resolve().parents[1]

needs_uid_switch = pytest.mark.skipif(
    not isolation().uid_switch, reason="needs the per-run uid (run the tests as root)"
)
needs_mount_namespace = pytest.mark.skipif(
    not isolation().mount_namespace, reason="needs a private mount namespace (root with CAP_SYS_ADMIN)"
)


def live_processes_of(uid: int) -> list[int]:
    """Pids whose real uid is `uid`, zombies excluded (dead already; reaping them is init's job)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def first_line_uid(stdout: str) -> int:
    return int(stdout.splitlines()[0])


def test_isolation_is_reported():
    iso = isolation()
    assert iso.describe().startswith("sandbox isolation:")
    if os.geteuid() == 0:
        assert iso.uid_switch, iso.notes


def test_a_normal_program_runs():
    r = run_python("import sys\nprint('hello')\nprint('oops', file=sys.stderr)", timeout_s=5)
    assert (r.status, r.returncode, r.stdout, r.stderr, r.truncated) == ("ok", 0, "hello\n", "oops\n", False)
    assert r.passed


def test_an_exception_is_an_error_with_its_traceback():
    r = run_python("raise ValueError('boom')", timeout_s=5)
    assert r.status == "error" and r.returncode == 1 and not r.passed
    assert "ValueError: boom" in r.stderr


def test_run_tests_passes_and_fails():
    program = "def add(a, b):\n    return a + b\n"
    assert run_tests(program, "assert add(2, 3) == 5", timeout_s=5).passed
    failing = run_tests(program, "assert add(2, 3) == 6", timeout_s=5)
    assert not failing.passed and failing.status == "error" and "AssertionError" in failing.stderr
    assert not run_tests("def add(a, b) return a + b", "assert add(2, 3) == 5", timeout_s=5).passed


@pytest.mark.parametrize("early_exit", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"])
def test_exiting_before_the_tests_run_does_not_pass(early_exit):
    r = run_tests(f"def add(a, b):\n    return a - b\n{early_exit}\n", "assert add(2, 3) == 5", timeout_s=5)
    # the candidate exited cleanly, but the judge could not call it: the tests never ran
    assert not r.passed and r.status == "error"
    assert "did not run to its end" in r.stderr


def test_the_candidates_stdout_is_kept_and_is_not_the_verdict():
    r = run_tests("print('hi')\ndef f():\n    return 1", "assert f() == 1", timeout_s=5)
    assert r.passed and r.stdout == "hi\n"


def test_an_infinite_loop_times_out():
    r = run_python("while True:\n    pass", timeout_s=1, cpu_s=10)
    assert r.status == "timeout" and not r.passed
    assert r.duration_s < 3


def test_a_sleeping_program_times_out_on_the_wall_clock():
    r = run_python("import time\ntime.sleep(60)", timeout_s=0.5)
    assert r.status == "timeout" and r.duration_s < 2


def test_cpu_time_is_limited_separately():
    r = run_python("while True:\n    pass", timeout_s=10, cpu_s=1)
    assert r.status == "timeout" and r.duration_s < 5


def test_a_memory_bomb_fails_and_the_parent_is_fine():
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))", timeout_s=5,
                   memory_mb=256)
    assert r.status in ("error", "killed") and not r.passed
    if r.status == "error":
        assert "MemoryError" in r.stderr
    assert run_python("print(1)", timeout_s=5).passed  # and the next run is unaffected


@needs_uid_switch
def test_a_fork_bomb_is_contained_and_leaves_no_process():
    bomb = textwrap.dedent("""\
        import os
        print(os.getuid(), flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """)
    r = run_python(bomb, timeout_s=1.5, max_processes=16)
    assert r.status == "timeout" and not r.passed
    assert live_processes_of(first_line_uid(r.stdout)) == []


@needs_uid_switch
def test_a_daemonized_grandchild_dies_with_the_run():
    daemon = textwrap.dedent("""\
        import os, time
        print(os.getuid(), flush=True)
        if os.fork() == 0:
            os.setsid()  # leaves our process group: killpg alone would miss it
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        """)
    r = run_python(daemon, timeout_s=5)
    assert r.status == "ok" and r.duration_s < 3
    assert live_processes_of(first_line_uid(r.stdout)) == []


@pytest.mark.skipif(SECCOMP is None, reason="seccomp filter only on x86_64 and aarch64")
def test_no_process_of_a_run_can_leave_its_process_group():
    # without the per-run uid (no root) the final killpg is all that ends a run's processes: one that called
    # setsid() lived on after the run (measured: a sleeping grandchild outlived it, under our uid)
    program = textwrap.dedent("""\
        import os
        for name, call in (("setsid", os.setsid), ("setpgid", lambda: os.setpgid(0, 0))):
            if os.fork() == 0:
                try:
                    call()
                    print(name, flush=True)
                finally:
                    os._exit(0)
            os.wait()
        """)
    r = run_python(program, timeout_s=5)
    assert r.status == "ok" and r.stdout == "", (r.stdout, r.stderr)


@needs_mount_namespace
def test_writing_outside_the_working_directory_leaves_no_file():
    name = f"kat-sandbox-escape-{secrets.token_hex(6)}"
    targets = [Path("/tmp") / name, Path("/var/tmp") / name, Path("/dev/shm") / name, PROJECT_ROOT / name]
    program = textwrap.dedent(f"""\
        for path in {[str(t) for t in targets]!r}:
            try:
                with open(path, "w") as f:
                    f.write("escaped")
            except OSError as exc:
                print(path, type(exc).__name__)
        """)
    r = run_python(program, timeout_s=5)
    assert r.status == "ok", r.stderr
    assert f"{PROJECT_ROOT / name} " in r.stdout  # refused outright outside the private temp dirs
    for target in targets:
        assert not target.exists(), target


def test_the_working_directory_is_writable_and_fresh():
    r = run_python("import os\nprint(sorted(os.listdir()))\nopen('scratch.txt', 'w').write('x')", timeout_s=5)
    assert r.status == "ok", r.stderr
    again = run_python("import os\nprint(sorted(os.listdir()))", timeout_s=5)
    assert again.stdout == r.stdout == "['main.py']\n"  # the previous run's file is gone


def test_the_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", timeout_s=5)
        assert r.status == "error" and "Error" in r.stderr
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody ever connected
    finally:
        server.close()


def test_an_output_flood_is_capped():
    r = run_python("while True:\n    print('x' * 1000)", timeout_s=5, max_output_bytes=10_000)
    assert r.status == "output_limit" and r.truncated and not r.passed
    assert len(r.stdout) == 10_000 and r.duration_s < 3


@needs_uid_switch
@pytest.mark.parametrize("attack", [
    "os.kill(os.getppid(), signal.SIGKILL)",
    "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "os.kill(-1, signal.SIGKILL)",
])
def test_the_child_cannot_kill_its_parent(attack):
    r = run_python(f"import os, signal\n{attack}\nprint('still here')", timeout_s=5)
    # we are still running, which is the point; the attack failed or, for kill(-1), hit nothing of ours
    assert r.status in ("error", "ok")
    assert os.getpid() > 0


def test_children_fork_from_a_launcher_not_from_the_caller():
    # the caller may be big (torch, a model): its page tables make every fork slow
    # (benchmarks/bench_sandbox_launch.py); a launcher is a small process of its own
    code = "import os\nprint(os.getppid())"
    try:
        configure(launcher=True)
        launched = {run_python(code, timeout_s=5).stdout.strip() for _ in range(3)}
        configure(launcher=False)
        here = run_python(code, timeout_s=5).stdout.strip()
    finally:
        configure()
    assert here == str(os.getpid())
    assert launched and str(os.getpid()) not in launched and all(p.isdigit() for p in launched)


def test_a_dead_launcher_fails_its_calls_in_one_line_and_the_next_run_starts_a_new_one():
    import kat_core.tasks.sandbox as sandbox

    assert run_python("print(1)", timeout_s=5).stdout == "1\n"
    first = sandbox._the_launcher()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(run_python, "import time\ntime.sleep(20)", timeout_s=30)
        time.sleep(1.0)
        first._proc.kill()
        with pytest.raises(KatError, match="launcher process exited") as err:
            waiting.result(timeout=20)
    assert "\n" not in str(err.value)
    assert run_python("print(2)", timeout_s=5).stdout == "2\n" and sandbox._the_launcher() is not first


def test_the_parent_environment_does_not_leak(monkeypatch):
    monkeypatch.setenv("KAT_SANDBOX_SECRET", "hunter2")
    r = run_python("import os\nprint(sorted(os.environ))", timeout_s=5)
    assert "KAT_SANDBOX_SECRET" not in r.stdout and "hunter2" not in r.stdout


@needs_uid_switch
def test_a_bomb_does_not_disturb_concurrent_runs():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    with ThreadPoolExecutor(4) as pool:
        bombing = pool.submit(run_python, bomb, timeout_s=2, max_processes=16)
        time.sleep(0.2)
        normal = list(pool.map(
            lambda i: run_tests(f"def x():\n    return {i}", f"assert x() == {i}", timeout_s=10), range(12)))
        assert bombing.result().status == "timeout"
    assert all(r.passed for r in normal), [r.summary() for r in normal if not r.passed]


# --- what a hostile program can reach, and the fallback without namespaces -----------------------------

READ_ATTEMPTS = ["/proc/self/status", "/proc/1/cmdline", "/etc/passwd", str(PROJECT_ROOT / "pyproject.toml"),
                 "/work/shared/benchmarks/gsm8k_test.jsonl"]


def readable_in_sandbox() -> list[str]:
    program = textwrap.dedent(f"""\
        for path in {READ_ATTEMPTS!r}:
            try:
                open(path, "rb").read(1)
                print(path)
            except OSError:
                pass
        """)
    r = run_python(program, timeout_s=5)
    assert r.status == "ok", r.stderr
    return r.stdout.split()


@pytest.mark.skipif(not isolation().landlock, reason="needs Landlock (Linux >= 5.13)")
def test_only_the_interpreter_and_system_libraries_are_readable():
    # /proc (ours, the judge's), the project and the benchmark files (the answer key) stay out of reach
    assert readable_in_sandbox() == []


def reachable_by_others(path: str) -> bool:
    """Whether a uid other than the owner can traverse to `path` (o+x on every directory above it)."""
    parts = Path(path).resolve().parents
    return all(p.stat().st_mode & 0o001 for p in parts)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the root fallback is about running as root")


@pytest.fixture
def without_namespaces():
    configure(namespaces=False)
    try:
        yield isolation()
    finally:
        configure()


@needs_root
def test_without_namespaces_root_still_drops_to_an_unprivileged_uid(without_namespaces):
    iso = without_namespaces
    assert iso.uid_switch and not iso.runs_as_root and not iso.mount_namespace and not iso.network_namespace
    assert run_tests("def f(x):\n    return x + 1", "assert f(1) == 2", timeout_s=5).passed
    hostile = "class Y(int):\n    def __eq__(s, o):\n        return True\ndef f(x):\n    return Y(0)"
    assert not run_tests(hostile, "assert f(1) == 2", timeout_s=5).passed


@needs_root
def test_without_namespaces_the_listed_escapes_are_contained(without_namespaces):
    name = f"kat-sandbox-escape-{secrets.token_hex(6)}"
    targets = [Path("/tmp") / name, Path("/var/tmp") / name, Path("/dev/shm") / name, PROJECT_ROOT / name]
    tcp, udp = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (tcp, udp):
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    tcp.listen()
    program = textwrap.dedent(f"""\
        import os, signal, time, _socket
        print(os.getuid(), flush=True)
        for attack in (lambda: os.kill(os.getppid(), signal.SIGKILL),
                       lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGKILL),
                       lambda: os.kill(-1, signal.SIGKILL)):
            try:
                attack()
            except OSError:
                pass
        for path in {[str(t) for t in targets]!r}:
            try:
                open(path, "w").write("escaped")
            except OSError:
                pass
        for family, kind, send in ((_socket.AF_INET, _socket.SOCK_STREAM, "connect"),
                                   (_socket.AF_INET, _socket.SOCK_DGRAM, "sendto"),
                                   (_socket.AF_INET, _socket.SOCK_RAW, "sendto")):
            try:
                s = _socket.socket(family, kind, 255 if kind == _socket.SOCK_RAW else 0)
                if send == "connect":
                    s.connect(("127.0.0.1", {tcp.getsockname()[1]}))
                    s.send(b"escaped")
                else:
                    s.sendto(b"escaped", ("127.0.0.1", {udp.getsockname()[1]}))
                print("sent", kind)
            except OSError:
                pass
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        """)
    try:
        r = run_python(program, timeout_s=5)
        assert r.status == "ok", r.stderr
        assert "sent" not in r.stdout
        for s in (tcp, udp):
            with pytest.raises(BlockingIOError):
                s.accept() if s is tcp else s.recvfrom(100)
    finally:
        tcp.close()
        udp.close()
    for target in targets:
        assert not target.exists(), target
    assert live_processes_of(first_line_uid(r.stdout)) == []  # the daemon died with the run
    assert os.getpid() > 0  # and we are still here


@needs_root
def test_as_root_without_a_reachable_interpreter_the_sandbox_refuses(without_namespaces, monkeypatch):
    import kat_core.tasks.sandbox as sandbox
    from kat_core.errors import KatError

    if reachable_by_others(sys.base_prefix):
        pytest.skip("our interpreter is reachable by other uids here, so nothing forces the refusal")
    monkeypatch.setattr(sandbox, "_FALLBACK_PYTHONS", ())
    configure(namespaces=False, launcher=False)  # the patch lives in this process, not in the launchers
    with pytest.raises(KatError, match="refuses to run untrusted code as root") as err:
        run_python("print(1)", timeout_s=5)
    assert "\n" not in str(err.value) and "KAT_SANDBOX_UNSAFE_ROOT=1" in str(err.value)
    configure(namespaces=False, unsafe_root=True, launcher=False)  # the explicit opt-in: runs as root, still confined
    iso = isolation()
    assert iso.runs_as_root and "UNSAFE" in iso.describe()
    if iso.landlock:
        assert readable_in_sandbox() == []

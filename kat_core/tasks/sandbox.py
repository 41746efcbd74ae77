"""Run untrusted Python (model-written code) in a contained child process.

Layers, strongest first; `isolation()` probes once which of them this machine allows and says so:

- **Own uid** (when we run as root): every run gets a fresh unprivileged uid and gid with no
  supplementary groups. That makes RLIMIT_NPROC bite (the kernel exempts root from it), stops the
  child from signalling its parent or touching root-owned files, and lets us kill every process the
  run left behind (`kill(-1)` sent as that uid), daemonized grandchildren included.
- **Namespaces** (root with CAP_SYS_ADMIN): a new network namespace (no interface is up, so nothing is
  reachable, loopback included), a new IPC namespace (SysV and POSIX IPC objects die with the run) and a
  new mount namespace in which the whole file system is read-only,
  /tmp, /var/tmp, /dev/shm and /run/lock are fresh size-capped tmpfs, and the working directory lives in
  that private /tmp, so it vanishes with the run. The interpreter is bind-mounted read-only into the
  private /tmp too, because it may sit where the unprivileged uid cannot reach (pyenv under /root).
- **Landlock** (Linux >= 5.13, any uid): the child may read and execute only the interpreter, the system
  libraries and a few /dev nodes, and write only in its working directory. So it cannot read the
  benchmark files or our virtual environment (the answer key), /proc (its parent's or the judge's state),
  or write anywhere else; with ABI >= 4 it cannot make TCP connections, with ABI >= 6 it cannot signal
  processes outside the sandbox, and it can never ptrace one.
- **seccomp** (x86_64, aarch64): `socket()` for any family but AF_UNIX fails (UDP and raw sockets too,
  which Landlock does not cover), and so does io_uring, which could open sockets behind its back. So do the
  calls that leave kernel state behind the run (keyrings, SysV and POSIX IPC) or take a process out of
  its process group (setsid, setpgid): memory that outlives the verdict, and a memory from one run to the
  next in which a candidate could collect which of its answers passed (confinement.Seccomp says how).
- **Always**: own session and process group, `python -I -S -B` (isolated mode: no environment
  variables, user site or script directory on sys.path; no `site`, so only the standard library is
  importable (not our virtual environment) and startup is quicker, but site's `exit()`/`quit()` helpers
  are absent: use `sys.exit()`), a minimal environment (no parent secrets), rlimits on CPU time, address space, file
  size, open files and core dumps, a wall-clock timeout, capped output, PR_SET_NO_NEW_PRIVS, a parent
  death signal, and the whole process group killed when the call returns.

**Without namespaces** (unavailable, or `KAT_SANDBOX_NAMESPACES=0`) the working directory is a temporary
directory on the host (mode 0700, owned by the run's uid) that is removed afterwards, and Landlock and
seccomp carry the file and network containment. **As root, untrusted code never runs as root**: without
namespaces the child drops to the per-run uid with an interpreter that uid can execute (ours, else
/usr/bin/python3 or /usr/local/bin/python3, which must be Python >= 3.8); if no such interpreter works the
sandbox refuses with one line, unless `KAT_SANDBOX_UNSAFE_ROOT=1` says to run it as root anyway (then only
Landlock, seccomp and the rlimits stand between the code and the machine). `configure()` sets both from
code.

run_tests() keeps the verdict out of the candidate's reach: the tests run in a second sandboxed process
(the judge, under another uid) and call the candidate's functions over a pipe, receiving plain data
(kat_core.tasks.judge); only the judge's output, which the candidate cannot write, says whether the tests
passed.

Runs are started from small launcher processes, not from the caller (see "launching" below): a fork from a
process holding torch and a model costs several times more.
"""

from __future__ import annotations

import ast
import atexit
import ctypes
import json
import logging
import math
import os
import queue
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kat_core.errors import KatError
from kat_core.tasks import judge as _judge

# the kernel calls the child confines itself with
from kat_core.tasks.confinement import (
    AT_FDCWD,
    AT_RECURSIVE,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    LIBC,
    MOUNT_ATTR_RDONLY,
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    SECCOMP,
    SYS_MOUNT_SETATTR,
    Landlock,
    Seccomp,
    check,
    mount,
    write_file,
)
from kat_core.tasks.launcher import Launcher, serve

log = logging.getLogger(__name__)

# Fresh uids per run: base + (our pid mod 2**22) * 128 + slot, so concurrent runs, in this process or in
# another one on the same machine, never share a uid (a shared uid would share RLIMIT_NPROC and the
# final kill). Stays below 2**31.
_UID_BASE = 1_000_000_000
_UID_SLOTS = 128
_PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_SANDBOX_PYTHON = "/tmp/.kat-python"  # where the interpreter is bind-mounted inside the mount namespace
_SANDBOX_WORKDIR = "/tmp/sandbox"  # the working directory inside the mount namespace
# the base interpreter (relative to sys.base_prefix), not the virtual environment's
_BASE_PYTHON = os.path.join("bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
# read-only for the child under Landlock (besides the interpreter's own prefix): the system libraries
_SYSTEM_LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")
_DEVICE_FILES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
_LOADER_FILES = ("/etc/ld.so.cache",)
# interpreters an unprivileged uid may be able to run, when ours sits where it cannot reach (/root)
_FALLBACK_PYTHONS = ("/usr/local/bin/python3", "/usr/bin/python3")
_TMPFS_MB = 64
_FILE_SIZE_MB = 64
_MAX_OPEN_FILES = 256

STATUSES = ("ok", "error", "timeout", "killed", "output_limit")

# The judge's start: read its program and delete it. When the candidate shares its uid (no uid switch),
# first make itself non-dumpable (PR_SET_DUMPABLE 0 bars ptrace and /proc/<pid>/mem to same-uid
# processes); with a uid of its own that is given, and importing ctypes costs ~15 ms per item.
_JUDGE_NOT_DUMPABLE = "import ctypes\nctypes.CDLL(None).prctl(4, 0, 0, 0, 0)\n"
_JUDGE_BOOT = """\
with open("main.py", "rb") as f:
    source = f.read()
__import__("os").unlink("main.py")
exec(compile(source, "judge.py", "exec"), {"__name__": "__main__"})
"""


@dataclass
class SandboxResult:
    """What one run did. `status`: ok (exit 0), error (non-zero exit), timeout (wall clock or CPU time),
    killed (by a signal, e.g. the kernel), output_limit (stdout or stderr passed the cap)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    truncated: bool = False
    passed: bool = False  # run_python: status == "ok"; run_tests: the tests ran to the end and passed

    def summary(self) -> str:
        tail = (self.stderr.strip().splitlines() or [""])[-1]
        return f"{self.status} (rc={self.returncode}, {self.duration_s:.2f}s){': ' + tail if tail else ''}"


@dataclass(frozen=True)
class Isolation:
    """Which containment layers are active on this machine, as observed by a probe run."""

    uid_switch: bool
    network_namespace: bool
    mount_namespace: bool
    readonly_root: bool
    landlock: bool = False  # the probe could not read a file outside the allowed trees
    seccomp: bool = False  # the probe could not open an AF_INET socket (seccomp, or no network at all)
    runs_as_root: bool = False  # only with KAT_SANDBOX_UNSAFE_ROOT=1
    interpreter: str = ""
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        on = [name for name in ("uid_switch", "network_namespace", "mount_namespace", "readonly_root", "landlock",
                                "seccomp") if getattr(self, name)]
        text = "sandbox isolation: " + (", ".join(on) or "rlimits and process group only")
        return text + (" (UNSAFE: untrusted code runs as root)" if self.runs_as_root else "")


@dataclass(frozen=True)
class _Plan:
    namespaces: bool
    switch_uid: bool
    executable: str = ""  # the interpreter on the host (namespaces: bind-mounted from sys.base_prefix)


_slots: queue.Queue[int] = queue.Queue()
for _slot in range(_UID_SLOTS):
    _slots.put(_slot)
_probe_lock = threading.Lock()
_probed: tuple[_Plan, Isolation] | None = None
_settings: dict[str, bool | None] = {"namespaces": None, "unsafe_root": None, "launcher": None}


def configure(*, namespaces: bool | None = None, unsafe_root: bool | None = None,
              launcher: bool | None = None) -> None:
    """Choose the plan from code (None: from the environment, KAT_SANDBOX_NAMESPACES=0,
    KAT_SANDBOX_UNSAFE_ROOT=1 and KAT_SANDBOX_LAUNCHER=0); the next run probes again."""
    global _probed
    with _probe_lock:
        _settings.update(namespaces=namespaces, unsafe_root=unsafe_root, launcher=launcher)
        _probed = None


def _setting(name: str, env: str, default: bool) -> bool:
    value = _settings[name]
    if value is not None:
        return value
    raw = os.environ.get(env, "").strip().lower()
    return default if not raw else raw not in ("0", "false", "no", "off")


def isolation() -> Isolation:
    """Probe (once per process) the strongest plan this machine allows and what it actually gives."""
    return _launch(_isolation_here)


def run_python(
    code: str,
    *,
    timeout_s: float = 10,
    cpu_s: int | None = None,
    memory_mb: int = 512,
    max_output_bytes: int = 64_000,
    max_processes: int = 32,
) -> SandboxResult:
    """Run `code` as a script in a fresh sandbox. Limits: wall clock `timeout_s`, CPU seconds `cpu_s`
    (default: the timeout rounded up), address space `memory_mb` per process, `max_output_bytes` per
    stream, `max_processes` processes and threads (exact with the uid switch; without it, shared with
    whatever else runs under our uid at the same time; not enforceable when we are root without it)."""
    return _launch(_run_python_here, code, timeout_s, cpu_s, memory_mb, max_output_bytes, max_processes)


def run_tests(program: str, tests: str, *, functions: Sequence[str] | None = None, setup: str = "",
              **limits: float | int | None) -> SandboxResult:
    """Run `tests` against the functions `program` defines; passed only if every test ran and passed.

    The program runs in one sandboxed process (the candidate), the tests in another (the judge, under
    its own uid), after `setup` (trusted code the tests need, e.g. a HumanEval prompt's helpers). In the
    judge each name in `functions` (default: every top-level function the program defines) is a stub
    that calls the candidate's function over a pipe and gets its result back as plain data
    (kat_core.tasks.judge). The verdict is the judge's alone, so whatever the candidate does inside its
    own interpreter (lying `__eq__`, patched builtins, early exits, printed markers) cannot reach it.

    The result: the judge's status; stdout is the candidate's; stderr the candidate's, then the judge's
    (a failed assert's traceback, or why the candidate could not be called).
    """
    return _launch(_run_tests_here, program, tests, functions, setup, limits)


def _isolation_here() -> Isolation:
    return _plan_and_isolation()[1]


def _run_python_here(code: str, timeout_s: float, cpu_s: int | None, memory_mb: int, max_output_bytes: int,
                     max_processes: int) -> SandboxResult:
    plan, _ = _plan_and_isolation()
    return _run(plan, code, timeout_s, cpu_s, memory_mb, max_output_bytes, max_processes)


def _run_tests_here(program: str, tests: str, functions: Sequence[str] | None, setup: str,
                    limits: dict[str, float | int | None]) -> SandboxResult:
    if functions is None:
        functions = _top_level_functions(program)
    req_r, req_w = os.pipe()  # judge -> candidate: calls
    resp_r, resp_w = os.pipe()  # candidate -> judge: results
    candidate_code = (
        f"{program}\n\n\n# --- kat: answer the judge's calls ---\n"
        f"__kat_wire = {{'__name__': 'kat_wire'}}\n"
        f"exec(compile({_WIRE_SOURCE!r}, 'kat_wire', 'exec'), __kat_wire)\n"
        f"__kat_wire['serve']({req_r}, {resp_w}, globals())\n"
    )
    judge_code = (
        f"wire = {{'__name__': 'kat_wire'}}\n"
        f"exec(compile({_WIRE_SOURCE!r}, 'kat_wire', 'exec'), wire)\n"
        f"wire['judge']({req_w}, {resp_r}, {setup!r}, {tests!r}, {list(functions)!r})\n"
    )
    plan, _ = _plan_and_isolation()
    kwargs = _limits(**limits)
    cancel = threading.Event()
    outcome: dict[str, SandboxResult | BaseException] = {}

    def run_candidate() -> None:
        try:
            outcome["candidate"] = _run(plan, candidate_code, **kwargs, pass_fds=(req_r, resp_w), cancel=cancel)
        except BaseException as exc:  # re-raised below, in the caller's thread
            outcome["candidate"] = exc

    thread = threading.Thread(target=run_candidate, name="kat-sandbox-candidate", daemon=True)
    thread.start()
    try:
        boot = _JUDGE_BOOT if plan.switch_uid else _JUDGE_NOT_DUMPABLE + _JUDGE_BOOT
        verdict = _run(plan, judge_code, **kwargs, pass_fds=(req_w, resp_r), boot=boot)
    finally:
        cancel.set()  # the judge is done: a candidate still running has nothing left to answer
        thread.join()
    candidate = outcome["candidate"]
    if isinstance(candidate, BaseException):
        raise candidate
    lines = verdict.stdout.rstrip("\n").splitlines()
    return SandboxResult(
        status=verdict.status,
        returncode=verdict.returncode,
        stdout=candidate.stdout,
        stderr=candidate.stderr + verdict.stderr,
        duration_s=max(verdict.duration_s, candidate.duration_s),
        truncated=verdict.truncated or candidate.truncated,
        passed=verdict.status == "ok" and bool(lines) and lines[-1].startswith(_judge.VERDICT_PASS),
    )


def _limits(timeout_s: float = 10, cpu_s: int | None = None, memory_mb: int = 512, max_output_bytes: int = 64_000,
            max_processes: int = 32) -> dict[str, Any]:
    return {"timeout_s": timeout_s, "cpu_s": cpu_s, "memory_mb": memory_mb, "max_output_bytes": max_output_bytes,
            "max_processes": max_processes}


def _top_level_functions(program: str) -> list[str]:
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError):
        return []  # the candidate fails to start; the judge reports that
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


# the judge module's own source, pasted into both programs (they cannot import kat_core)
_WIRE_SOURCE = Path(_judge.__file__).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# launching: sandboxes fork from a small process
#
# fork() copies the caller's page tables, and the children need a fork (the confinement runs between fork
# and exec). From a process holding torch and a model (an evaluation, the RL stage, a test worker) that made
# every run several times slower than from a bare interpreter (benchmarks/bench_sandbox_launch.py). So runs
# happen in a launcher (kat_core.tasks.launcher): one small process per caller, spawned once, importing only
# this module. KAT_SANDBOX_LAUNCHER=0 (or configure(launcher=False)) runs them in the calling process.

_launcher_lock = threading.Lock()
_launcher: Launcher | None = None
_in_launcher = False


def _launch(fn, *args):
    """fn(*args) in the launcher (or here: inside the launcher, or when launching is off), under the
    caller's settings."""
    if _in_launcher or not _setting("launcher", "KAT_SANDBOX_LAUNCHER", True):
        return fn(*args)
    settings = {"namespaces": _setting("namespaces", "KAT_SANDBOX_NAMESPACES", True),
                "unsafe_root": _setting("unsafe_root", "KAT_SANDBOX_UNSAFE_ROOT", False)}
    return _the_launcher().call(fn.__name__, settings, args)


def _the_launcher() -> Launcher:
    global _launcher
    with _launcher_lock:
        if _launcher is None or _launcher.owner != os.getpid() or not _launcher.alive:
            if _launcher is None:
                atexit.register(_close_launcher)
            _launcher = Launcher(__spec__.name)  # this module, run as the launcher (its __main__ below)
        return _launcher


def _close_launcher() -> None:
    with _launcher_lock:
        if _launcher is not None:
            _launcher.close()


_LAUNCHED = {f.__name__: f for f in (_isolation_here, _run_python_here, _run_tests_here)}


def _launched(name: str, settings: dict[str, bool], args: tuple):
    """In the launcher: take the caller's settings (probing again when they changed), then run."""
    global _probed
    if name not in _LAUNCHED:
        raise KatError(f"the sandbox launcher does not run {name!r}")
    with _probe_lock:
        if any(_settings[k] != v for k, v in settings.items()):
            _settings.update(settings)
            _probed = None
    return _LAUNCHED[name](*args)


# ---------------------------------------------------------------------------------------------------
# probing


def _plan_and_isolation() -> tuple[_Plan, Isolation]:
    global _probed
    with _probe_lock:
        if _probed is None:
            _probed = _probe()
            iso = _probed[1]
            if iso.runs_as_root:
                log.warning("%s (KAT_SANDBOX_UNSAFE_ROOT is set)", iso.describe())
            elif not (iso.uid_switch and iso.network_namespace):
                log.warning("%s (weaker than full isolation: %s)", iso.describe(),
                            "; ".join(iso.notes) or "not running as root")
        return _probed


_PROBE_FILE = "/etc/passwd"  # world-readable everywhere, and outside what Landlock lets the child read
_PROBE_CODE = f"""\
import json, os, socket, sys
def readable(path):
    try:
        open(path, "rb").close()
        return True
    except OSError:
        return False
def inet():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
        return True
    except OSError:
        return False
print(json.dumps({{
    "uid": os.getuid(),
    "version": list(sys.version_info[:2]),
    "readonly_root": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
    "private_tmp": os.getcwd() == {_SANDBOX_WORKDIR!r},
    "reads_host": readable({_PROBE_FILE!r}),
    "inet": inet(),
}}))
"""


def _probe() -> tuple[_Plan, Isolation]:
    root = os.geteuid() == 0
    base = os.path.join(sys.base_prefix, _BASE_PYTHON)
    base = base if os.path.exists(base) else os.path.realpath(sys.executable)
    unsafe_root = _setting("unsafe_root", "KAT_SANDBOX_UNSAFE_ROOT", False)
    plans = []
    if root:
        if _setting("namespaces", "KAT_SANDBOX_NAMESPACES", True):
            plans.append(_Plan(True, True, base))
        # without namespaces the uid must reach the interpreter itself: ours, else a system one
        plans += [_Plan(False, True, exe) for exe in dict.fromkeys([base, *_FALLBACK_PYTHONS]) if os.path.exists(exe)]
        if unsafe_root:
            plans.append(_Plan(False, False, base))
    else:
        plans.append(_Plan(False, False, base))
    notes: list[str] = []
    for plan in plans:
        try:
            result = _run(plan, _PROBE_CODE, 20, None, 512, 64_000, 32)
            if result.status != "ok":
                raise RuntimeError(result.summary())
            facts = json.loads(result.stdout)
        except (RuntimeError, KatError, ValueError, OSError) as exc:
            notes.append(f"{_plan_name(plan)} unavailable: {exc}")
            continue
        uid_switch = facts["uid"] != os.geteuid()
        if plan.switch_uid and not uid_switch:
            notes.append(f"{_plan_name(plan)} did not switch uid")
            continue
        if tuple(facts["version"]) < (3, 8):
            notes.append(f"{_plan_name(plan)}: Python {facts['version']} is older than 3.8")
            continue
        return plan, Isolation(
            uid_switch=uid_switch,
            network_namespace=plan.namespaces,
            mount_namespace=plan.namespaces and facts["private_tmp"],
            readonly_root=facts["readonly_root"],
            landlock=not facts["reads_host"],
            seccomp=not facts["inet"],
            runs_as_root=root and not uid_switch,
            interpreter=plan.executable,
            notes=tuple(notes),
        )
    if root and not unsafe_root:
        raise KatError(
            "the code sandbox refuses to run untrusted code as root and no unprivileged uid could run a Python "
            f"interpreter here ({'; '.join(notes)}); allow namespaces (CAP_SYS_ADMIN), install a Python the uid can "
            "reach (/usr/bin/python3), or set KAT_SANDBOX_UNSAFE_ROOT=1 to run it as root anyway"
        )
    raise KatError("the code sandbox cannot start a Python child on this machine: " + "; ".join(notes))


def _plan_name(plan: _Plan) -> str:
    how = "namespaces" if plan.namespaces else "no namespaces"
    who = "own uid" if plan.switch_uid else "our uid"
    return f"{how}, {who}, {plan.executable}"


# ---------------------------------------------------------------------------------------------------
# one run


def _run(
    plan: _Plan,
    code: str,
    timeout_s: float,
    cpu_s: int | None,
    memory_mb: int,
    max_output_bytes: int,
    max_processes: int,
    pass_fds: tuple[int, ...] = (),
    cancel: threading.Event | None = None,
    boot: str | None = None,
) -> SandboxResult:
    """One sandboxed run of `code` (as main.py). `pass_fds` are handed to the child and closed here once it
    has them (always: the caller must not touch them again); `cancel` kills the run early; `boot`, if
    given, is run with `-c` instead of main.py (it reads main.py itself)."""
    open_fds = list(pass_fds)
    slot = _slots.get() if plan.switch_uid else None
    uid = None if slot is None else _UID_BASE + (os.getpid() % 2**22) * _UID_SLOTS + slot
    host_dir = None if plan.namespaces else tempfile.mkdtemp(prefix="kat-sandbox-")
    try:
        program = code.encode("utf-8", "surrogateescape")
        if host_dir is not None:
            _write_program(host_dir, program)
            if uid is not None:
                os.chown(host_dir, uid, uid)
        if plan.namespaces:
            workdir, executable = _SANDBOX_WORKDIR, os.path.join(_SANDBOX_PYTHON, _BASE_PYTHON)
            read_dirs, read_files = [_SANDBOX_PYTHON], []
        else:
            workdir, executable = host_dir, plan.executable
            # the interpreter's own installation: its stdlib and libpython live in <prefix>/lib
            prefix = os.path.dirname(os.path.dirname(os.path.realpath(executable)))
            read_dirs, read_files = [os.path.join(prefix, "lib")], [executable, os.path.realpath(executable)]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
        if plan.namespaces:
            # the interpreter may carry an absolute RUNPATH to its libpython that the new uid cannot reach
            env["LD_LIBRARY_PATH"] = os.path.join(_SANDBOX_PYTHON, "lib")
        args = [executable, "-I", "-S", "-B"]
        args += ["-c", boot] if boot is not None else ["main.py"]
        cpu = cpu_s if cpu_s is not None else max(1, math.ceil(timeout_s))
        limits = [
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_CPU, cpu),
            (resource.RLIMIT_FSIZE, _FILE_SIZE_MB << 20),
            (resource.RLIMIT_NOFILE, _MAX_OPEN_FILES),
            (resource.RLIMIT_AS, memory_mb << 20),  # last: the forked parent may be far bigger than this
        ]
        if uid is not None:
            limits.insert(0, (resource.RLIMIT_NPROC, max_processes))
        elif os.geteuid() != 0:
            # our own uid: the kernel counts all its tasks, ours included, so grant the budget on top
            limits.insert(0, (resource.RLIMIT_NPROC, _count_tasks(os.getuid()) + max_processes))
        landlock = Landlock.prepare(read_dirs + list(_SYSTEM_LIB_DIRS), read_files + list(_LOADER_FILES),
                                     list(_DEVICE_FILES), workdir)
        preexec = _Preexec(plan, uid, workdir, program, limits, landlock, SECCOMP)
        return _execute(args, env, preexec, uid, timeout_s, max_output_bytes, open_fds, cancel)
    finally:
        for fd in open_fds:  # not handed over (we failed before the child started)
            os.close(fd)
        if host_dir is not None:
            shutil.rmtree(host_dir, ignore_errors=True)
        if slot is not None:
            _slots.put(slot)


def _write_program(directory: str, program: bytes) -> None:
    # plain os calls: this also runs in the forked child, where only async-signal-safe-ish code belongs
    fd = os.open(os.path.join(directory, "main.py"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(program)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


class _Preexec:
    """Runs in the forked child before exec: namespaces, mounts, the uid switch, rlimits.

    Everything it needs is computed in the parent; it imports nothing, so a lock another parent thread
    held at fork time cannot deadlock it.
    """

    def __init__(self, plan: _Plan, uid: int | None, workdir: str, program: bytes,
                 limits: list[tuple[int, int]], landlock: Landlock | None, seccomp: Seccomp | None) -> None:
        self.plan, self.uid, self.workdir, self.program, self.limits = plan, uid, workdir, program, limits
        self.landlock, self.seccomp = landlock, seccomp

    def __call__(self) -> None:
        write_file("/proc/self/oom_score_adj", b"1000")  # the OOM killer takes the sandbox first
        if self.plan.namespaces:
            self._enter_namespaces()
        os.chdir(self.workdir)
        if self.uid is not None:
            os.setgroups([])
            os.setresgid(self.uid, self.uid, self.uid)
            os.setresuid(self.uid, self.uid, self.uid)
        check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")  # no setuid binaries
        check(LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PDEATHSIG)")  # after setuid
        # both need NO_NEW_PRIVS first (an unprivileged process may not confine itself otherwise)
        if self.landlock is not None:
            self.landlock.apply()
        if self.seccomp is not None:
            self.seccomp.apply()
        for kind, value in self.limits:
            resource.setrlimit(kind, (value, value + 1 if kind == resource.RLIMIT_CPU else value))

    def _enter_namespaces(self) -> None:
        check(LIBC.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC), "unshare")
        # private first: nothing we mount below may propagate back to the host
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        python_fd = os.open(sys.base_prefix, os.O_PATH | os.O_DIRECTORY)
        attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)
        # best effort (kernel >= 5.12); the probe reports whether the root really is read-only
        word = ctypes.c_long  # syscall() is variadic: pass every integer at full register width
        LIBC.syscall(word(SYS_MOUNT_SETATTR), word(AT_FDCWD), b"/", word(AT_RECURSIVE),
                      ctypes.byref(attr), word(ctypes.sizeof(attr)))
        for directory in _PRIVATE_TMP_DIRS:
            if os.path.isdir(directory):
                size = _TMPFS_MB if directory == "/tmp" else _TMPFS_MB // 4
                mount(b"tmpfs", directory, b"tmpfs", MS_NOSUID | MS_NODEV,
                       f"size={size}m,nr_inodes=4096,mode=1777".encode())
        os.mkdir(_SANDBOX_PYTHON)
        mount(f"/proc/self/fd/{python_fd}".encode(), _SANDBOX_PYTHON, None, MS_BIND | MS_REC)
        mount(None, _SANDBOX_PYTHON, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(python_fd)
        os.mkdir(self.workdir, 0o755)
        _write_program(self.workdir, self.program)
        if self.uid is not None:
            os.chown(self.workdir, self.uid, self.uid)


def _execute(args: list[str], env: dict[str, str], preexec: _Preexec, uid: int | None, timeout_s: float,
             max_output_bytes: int, pass_fds: list[int], cancel: threading.Event | None) -> SandboxResult:
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            start_new_session=True, preexec_fn=preexec, close_fds=True, pass_fds=tuple(pass_fds),
        )
    except (subprocess.SubprocessError, OSError) as exc:
        raise KatError(f"the code sandbox could not start its child: {exc}") from exc
    finally:
        # the child has its copies now; ours must go, or the other end never sees end-of-file
        while pass_fds:
            os.close(pass_fds.pop())
    outcome = None
    try:
        out, err, outcome = _collect(proc, start + timeout_s, max_output_bytes, cancel)
    finally:
        # kill before reaping the child, so its process-group id cannot have been reused yet
        _kill_everything(proc.pid, uid)
        proc.wait()
        if outcome is not None:
            # the writers are dead now; whatever is still buffered in the pipes is the rest of the output
            _drain(proc, out, err, max_output_bytes)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    duration = time.monotonic() - start
    truncated = outcome == "output_limit" or max(len(out), len(err)) > max_output_bytes
    rc = proc.returncode
    if outcome == "timeout":
        status = "timeout"
    elif outcome == "cancelled":
        status = "killed"
    elif truncated:
        status = "output_limit"
    elif rc == 0:
        status = "ok"
    elif rc == -signal.SIGXCPU:
        status = "timeout"  # RLIMIT_CPU
    elif rc < 0:
        status = "killed"
    else:
        status = "error"
    return SandboxResult(
        status=status,
        returncode=rc,
        stdout=bytes(out[:max_output_bytes]).decode("utf-8", "replace"),
        stderr=bytes(err[:max_output_bytes]).decode("utf-8", "replace"),
        duration_s=duration,
        truncated=truncated,
        passed=status == "ok",
    )


def _collect(proc: subprocess.Popen, deadline: float, cap: int,
             cancel: threading.Event | None = None) -> tuple[bytearray, bytearray, str]:
    """Read both pipes until the child exits ("exited"), the deadline passes ("timeout"), a stream goes
    over the cap ("output_limit") or `cancel` is set ("cancelled")."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}  # type: ignore[union-attr]
    out, err = bufs.values()
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while True:
            if _has_exited(proc.pid):
                return out, err, "exited"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out, err, "timeout"
            if cancel is not None and cancel.is_set():
                return out, err, "cancelled"
            if not sel.get_map():
                # both pipes closed but the child still runs: wait for it without spinning
                time.sleep(min(remaining, 0.002))
                continue
            for key, _ in sel.select(min(remaining, 0.05)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                bufs[key.fd] += chunk
                if len(bufs[key.fd]) > cap:
                    return out, err, "output_limit"


def _drain(proc: subprocess.Popen, out: bytearray, err: bytearray, cap: int) -> None:
    deadline = time.monotonic() + 1.0  # writers outside our reach (no uid switch) must not hang us
    for stream, buf in ((proc.stdout, out), (proc.stderr, err)):
        fd = stream.fileno()  # type: ignore[union-attr]
        os.set_blocking(fd, False)
        while len(buf) <= cap and time.monotonic() < deadline:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            if not chunk:
                break
            buf += chunk


def _count_tasks(uid: int) -> int:
    """Threads of all processes whose real uid is `uid` (what RLIMIT_NPROC counts)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # gone meanwhile
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            total += int(fields.get("Threads", "1").strip())
    return total


def _has_exited(pid: int) -> bool:
    # WNOWAIT: look without reaping, so the pid (and process-group id) stays ours until we have killed
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_everything(pgid: int, uid: int | None) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        # kill(-1) sent as the run's own uid reaches exactly that uid's processes, wherever they moved
        pid = os.fork()
        if pid == 0:
            try:
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


if __name__ == "__main__":  # the launcher: `python -m kat_core.tasks.sandbox`, started by _the_launcher()
    # run the module under its own name, so results pickle as kat_core.tasks.sandbox's classes, not __main__'s
    from kat_core.tasks import sandbox as _module

    _module._in_launcher = True
    serve(_module._launched)

"""Run untrusted Python (model-written code) in a contained child process.

Layers, strongest first; `isolation()` probes once which of them this machine allows and says so:

- **Own uid** (when we run as root): every run gets a fresh unprivileged uid and gid with no
  supplementary groups. That makes RLIMIT_NPROC bite (the kernel exempts root from it), stops the
  child from signalling its parent or touching root-owned files, and lets us kill every process the
  run left behind (`kill(-1)` sent as that uid), daemonized grandchildren included.
- **Namespaces** (root with CAP_SYS_ADMIN): a new network namespace (no interface is up, so nothing is
  reachable, loopback included) and a new mount namespace in which the whole file system is read-only,
  /tmp, /var/tmp, /dev/shm and /run/lock are fresh size-capped tmpfs, and the working directory lives in
  that private /tmp, so it vanishes with the run. The interpreter is bind-mounted read-only into the
  private /tmp too, because it may sit where the unprivileged uid cannot reach (pyenv under /root).
- **Always**: own session and process group, `python -I -S -B` (isolated mode: no environment
  variables, user site or script directory on sys.path; no `site`, so only the standard library is
  importable (not our virtual environment) and startup is quicker, but site's `exit()`/`quit()` helpers
  are absent: use `sys.exit()`), a minimal environment (no parent secrets), rlimits on CPU time, address space, file
  size, open files and core dumps, a wall-clock timeout, capped output, PR_SET_NO_NEW_PRIVS, a parent
  death signal, and the whole process group killed when the call returns.
- **Without namespaces**, a prelude replaces `socket.socket` so that network use fails (best effort: code
  that means to get around it can) and the working directory is a temporary directory on the host that
  is removed afterwards.

run_tests() decides pass/fail with a per-run random nonce printed after the last test, so a program that
exits early with status 0 (`sys.exit(0)`, `os._exit(0)`) does not pass.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import queue
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from kat_core.errors import KatError

# Linux constants (sched.h, mount.h, prctl.h); Python 3.11 has no os.unshare / os.mount.
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT = 1, 2, 4, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new syscalls share one table)
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38

log = logging.getLogger(__name__)

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_LIBC.syscall.restype = ctypes.c_long
# prctl is variadic: fix full-width arguments, or the kernel may see garbage in the unused ones (EINVAL)
_LIBC.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4

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
_TMPFS_MB = 64
_FILE_SIZE_MB = 64
_MAX_OPEN_FILES = 256

STATUSES = ("ok", "error", "timeout", "killed", "output_limit")

# The fallback network guard (only without a network namespace), run before the program.
_NO_NETWORK_PRELUDE = """\
import socket as _socket_module

class _NoNetworkSocket(_socket_module.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network access is disabled in the sandbox")

_socket_module.socket = _NoNetworkSocket
_socket_module.create_connection = _NoNetworkSocket
del _socket_module, _NoNetworkSocket
import runpy
runpy.run_path("main.py", run_name="__main__")
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
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        on = [name for name in ("uid_switch", "network_namespace", "mount_namespace", "readonly_root")
              if getattr(self, name)]
        return "sandbox isolation: " + (", ".join(on) or "rlimits and process group only")


@dataclass(frozen=True)
class _Plan:
    namespaces: bool
    switch_uid: bool


_slots: queue.Queue[int] = queue.Queue()
for _slot in range(_UID_SLOTS):
    _slots.put(_slot)
_probe_lock = threading.Lock()
_probed: tuple[_Plan, Isolation] | None = None


def isolation() -> Isolation:
    """Probe (once per process) the strongest plan this machine allows and what it actually gives."""
    return _plan_and_isolation()[1]


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
    plan, _ = _plan_and_isolation()
    return _run(plan, code, timeout_s, cpu_s, memory_mb, max_output_bytes, max_processes)


def run_tests(program: str, tests: str, **limits: float | int | None) -> SandboxResult:
    """Run `program` followed by `tests` (asserts); passed only if the tests ran to their end.

    The pass sentinel is a random nonce the harness prints after the last test: an early exit with
    status 0 never prints it. (A program that reads its own source could find it; this guards against
    accidents, not a determined adversary, who gains nothing but a wrong reward.)
    """
    nonce = secrets.token_hex(16)
    script = (
        f"{program}\n\n\n# --- tests ---\n{tests}\n\n\n"
        f"__import__('os').write(1, b'\\n{nonce}\\n')\n"
    )
    result = run_python(script, **limits)  # type: ignore[arg-type]
    seen = nonce in result.stdout
    result.stdout = result.stdout.replace(f"\n{nonce}\n", "")
    result.passed = result.status == "ok" and seen
    return result


# ---------------------------------------------------------------------------------------------------
# probing


def _plan_and_isolation() -> tuple[_Plan, Isolation]:
    global _probed
    with _probe_lock:
        if _probed is None:
            _probed = _probe()
            if not (_probed[1].uid_switch and _probed[1].network_namespace):
                log.warning("%s (weaker than full isolation: %s)", _probed[1].describe(),
                            "; ".join(_probed[1].notes) or "not running as root")
        return _probed


_PROBE_CODE = f"""\
import json, os, socket
print(json.dumps({{
    "uid": os.getuid(),
    "interfaces": [name for _, name in socket.if_nameindex()],
    "readonly_root": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
    "private_tmp": os.getcwd() == {_SANDBOX_WORKDIR!r},
}}))
"""


def _probe() -> tuple[_Plan, Isolation]:
    root = os.geteuid() == 0
    plans = [_Plan(True, True), _Plan(False, True)] if root else []
    plans.append(_Plan(False, False))
    notes: list[str] = []
    for plan in plans:
        try:
            result = _run(plan, _PROBE_CODE, 20, None, 512, 64_000, 32)
            if result.status != "ok":
                raise RuntimeError(result.summary())
            facts = json.loads(result.stdout)
        except (RuntimeError, KatError, ValueError, OSError) as exc:
            notes.append(f"{plan} unavailable: {exc}")
            continue
        uid_switch = facts["uid"] != os.geteuid()
        if plan.switch_uid and not uid_switch:
            notes.append(f"{plan} did not switch uid")
            continue
        return plan, Isolation(
            uid_switch=uid_switch,
            network_namespace=plan.namespaces and set(facts["interfaces"]) <= {"lo"},
            mount_namespace=plan.namespaces and facts["private_tmp"],
            readonly_root=facts["readonly_root"],
            notes=tuple(notes),
        )
    raise KatError("the code sandbox cannot start a Python child on this machine: " + "; ".join(notes))


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
) -> SandboxResult:
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
        elif os.path.exists(os.path.join(sys.base_prefix, _BASE_PYTHON)):
            workdir, executable = host_dir, os.path.join(sys.base_prefix, _BASE_PYTHON)
        else:
            workdir, executable = host_dir, os.path.realpath(sys.executable)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
        if plan.namespaces:
            # the interpreter may carry an absolute RUNPATH to its libpython that the new uid cannot reach
            env["LD_LIBRARY_PATH"] = os.path.join(_SANDBOX_PYTHON, "lib")
        args = [executable, "-I", "-S", "-B"]
        args += ["main.py"] if plan.namespaces else ["-c", _NO_NETWORK_PRELUDE]
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
        preexec = _Preexec(plan, uid, workdir, program, limits)
        return _execute(args, env, preexec, uid, timeout_s, max_output_bytes)
    finally:
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
                 limits: list[tuple[int, int]]) -> None:
        self.plan, self.uid, self.workdir, self.program, self.limits = plan, uid, workdir, program, limits

    def __call__(self) -> None:
        _write_file("/proc/self/oom_score_adj", b"1000")  # the OOM killer takes the sandbox first
        if self.plan.namespaces:
            self._enter_namespaces()
        os.chdir(self.workdir)
        if self.uid is not None:
            os.setgroups([])
            os.setresgid(self.uid, self.uid, self.uid)
            os.setresuid(self.uid, self.uid, self.uid)
        _check(_LIBC.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")  # no setuid binaries
        _check(_LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PDEATHSIG)")  # after setuid
        for kind, value in self.limits:
            resource.setrlimit(kind, (value, value + 1 if kind == resource.RLIMIT_CPU else value))

    def _enter_namespaces(self) -> None:
        _check(_LIBC.unshare(_CLONE_NEWNS | _CLONE_NEWNET), "unshare")
        # private first: nothing we mount below may propagate back to the host
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
        python_fd = os.open(sys.base_prefix, os.O_PATH | os.O_DIRECTORY)
        attr = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY, 0, 0, 0)
        # best effort (kernel >= 5.12); the probe reports whether the root really is read-only
        word = ctypes.c_long  # syscall() is variadic: pass every integer at full register width
        _LIBC.syscall(word(_SYS_MOUNT_SETATTR), word(_AT_FDCWD), b"/", word(_AT_RECURSIVE),
                      ctypes.byref(attr), word(ctypes.sizeof(attr)))
        for directory in _PRIVATE_TMP_DIRS:
            if os.path.isdir(directory):
                size = _TMPFS_MB if directory == "/tmp" else _TMPFS_MB // 4
                _mount(b"tmpfs", directory, b"tmpfs", _MS_NOSUID | _MS_NODEV,
                       f"size={size}m,nr_inodes=4096,mode=1777".encode())
        os.mkdir(_SANDBOX_PYTHON)
        _mount(f"/proc/self/fd/{python_fd}".encode(), _SANDBOX_PYTHON, None, _MS_BIND | _MS_REC)
        _mount(None, _SANDBOX_PYTHON, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        os.close(python_fd)
        os.mkdir(self.workdir, 0o755)
        _write_program(self.workdir, self.program)
        if self.uid is not None:
            os.chown(self.workdir, self.uid, self.uid)


def _mount(source: bytes | None, target: str, fstype: bytes | None, flags: int,
           data: bytes | None = None) -> None:
    _check(_LIBC.mount(source, target.encode(), fstype, flags, data), f"mount {target}")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _write_file(path: str, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return
    try:
        os.write(fd, data)
    except OSError:
        pass
    finally:
        os.close(fd)


def _execute(args: list[str], env: dict[str, str], preexec: _Preexec, uid: int | None, timeout_s: float,
             max_output_bytes: int) -> SandboxResult:
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            start_new_session=True, preexec_fn=preexec, close_fds=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        raise KatError(f"the code sandbox could not start its child: {exc}") from exc
    outcome = None
    try:
        out, err, outcome = _collect(proc, start + timeout_s, max_output_bytes)
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


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytearray, bytearray, str]:
    """Read both pipes until the child exits ("exited"), the deadline passes ("timeout") or a stream goes
    over the cap ("output_limit")."""
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

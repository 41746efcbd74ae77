"""The small process sandboxed code is started from (why: kat_core.tasks.sandbox, "launching").

`Launcher` starts `python -m kat_core.tasks.launcher` once (a plain spawn, no fork of the caller) and sends it
calls of the sandbox's own functions over a pipe; the launcher runs each in a thread of its own, so calls
overlap as they would in the caller, and answers as they finish. Every message is a length-prefixed pickle:
(call id, function name, args) one way, (call id, ok, result or exception) the other. Only the sandbox's
functions in CALLABLE can be called, and only by the process that started the launcher (its pipes are
private). When the caller exits, the launcher reads end-of-file, finishes what runs and exits; if the
launcher dies, the calls waiting on it fail with one line and the next call starts a new one.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from kat_core.errors import KatError

CALLABLE = ("_isolation_here", "_run_python_here", "_run_tests_here")
_HEADER = struct.Struct("!Q")
_THREADS = 32  # calls running at once in the launcher (each mostly waits on its children)


def _send(stream: BinaryIO, message: Any, lock: threading.Lock) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        stream.write(_HEADER.pack(len(data)) + data)
        stream.flush()


def _receive(stream: BinaryIO) -> Any | None:
    """The next message, or None at end-of-file."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


class Launcher:
    """The caller's side: `call(name, settings, args)` runs `kat_core.tasks.sandbox.<name>(*args)` in the
    launcher, under the caller's sandbox settings."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])  # so the launcher imports this very kat_core
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env, close_fds=True)
        self.owner = os.getpid()  # a forked copy of the caller must start its own (no reader thread there)
        self._lock = threading.Lock()  # one writer at a time
        self._pending: dict[int, Future] = {}
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, name="kat-sandbox-launcher", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def call(self, name: str, settings: dict[str, bool], args: tuple) -> Any:
        future: Future = Future()
        with self._lock:
            call_id, self._next_id = self._next_id, self._next_id + 1
            self._pending[call_id] = future
        try:
            _send(self._proc.stdin, (call_id, name, (settings, args)), self._lock)  # type: ignore[arg-type]
        except (BrokenPipeError, ValueError):
            pass  # the reader fails the future when it sees the launcher gone
        if not self.alive and not self._reader.is_alive():
            self._fail_pending()
        return future.result()

    def _read(self) -> None:
        while (message := _receive(self._proc.stdout)) is not None:  # type: ignore[arg-type]
            call_id, ok, value = message
            with self._lock:
                future = self._pending.pop(call_id)
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        self._fail_pending()

    def _fail_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(KatError(
                    f"the code sandbox's launcher process exited (rc={self._proc.poll()}); the next run starts "
                    "a new one"))

    def close(self) -> None:
        """End-of-file for the launcher: it finishes what runs and exits."""
        try:
            self._proc.stdin.close()  # type: ignore[union-attr]
            self._proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()


def serve() -> None:
    """The launcher's side: answer calls from stdin on stdout until end-of-file."""
    from kat_core.tasks import sandbox

    sandbox.become_launcher()
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever else writes to stdout must not corrupt the replies
    requests = sys.stdin.buffer
    lock = threading.Lock()

    def answer(call_id: int, name: str, args: tuple) -> None:
        try:
            if name not in CALLABLE:
                raise KatError(f"the sandbox launcher does not run {name!r}")
            settings, fn_args = args
            reply = (call_id, True, sandbox.launched(settings, getattr(sandbox, name), fn_args))
        except BaseException as exc:  # the caller re-raises it
            try:
                pickle.dumps(exc)
            except Exception:
                exc = KatError(f"{type(exc).__name__}: {exc}")
            reply = (call_id, False, exc)
        _send(replies, reply, lock)

    with ThreadPoolExecutor(_THREADS, thread_name_prefix="kat-launch") as pool:
        while (message := _receive(requests)) is not None:
            pool.submit(answer, *message)


if __name__ == "__main__":
    serve()

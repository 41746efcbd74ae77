"""A small helper process that runs calls for its caller: the one sandboxed code is started from (why:
kat_core.tasks.sandbox, "launching").

`Launcher(module)` starts `python -m module` once (a plain spawn, no fork of the caller); that module answers
with `serve(handler)`. Calls go over its stdin, answers come back on its stdout as they finish, each call
handled in a thread of its own, so calls overlap as they would in the caller. Every message is a
length-prefixed pickle: (call id, name, args) one way, (call id, ok, result or exception) the other; the pipes
are private to the caller. When the caller exits, the helper reads end-of-file, finishes what runs and exits;
if it dies, the calls waiting on it fail with one line and the caller's next call starts a new one.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from kat_core.errors import KatError

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
    """The caller's side: `call(name, *args)` returns what the helper's handler returns for them."""

    def __init__(self, module: str) -> None:
        root = str(Path(__file__).resolve().parents[2])  # so the helper imports this very kat_core
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env, close_fds=True)
        self.owner = os.getpid()  # a forked copy of the caller must start its own (no reader thread there)
        self._lock = threading.Lock()  # one writer at a time; registering and closing are atomic
        self._closed = False  # the reader saw end-of-file: no answer will come any more
        self._pending: dict[int, Future] = {}
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, name="kat-sandbox-launcher", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        # the closed flag first: the helper's pipes close a moment before the kernel lets it be reaped
        return not self._closed and self._proc.poll() is None

    def call(self, name: str, *args: Any) -> Any:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise self._gone()
            call_id, self._next_id = self._next_id, self._next_id + 1
            self._pending[call_id] = future
        try:
            _send(self._proc.stdin, (call_id, name, args), self._lock)  # type: ignore[arg-type]
        except (BrokenPipeError, ValueError):
            pass  # the helper is gone: the reader fails the future when it reads end-of-file
        return future.result()

    def _read(self) -> None:
        try:
            while (message := _receive(self._proc.stdout)) is not None:  # type: ignore[arg-type]
                call_id, ok, value = message
                with self._lock:
                    future = self._pending.pop(call_id)
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        finally:  # end-of-file, or a reply this side cannot read: no answer will come any more
            with self._lock:  # after this no call can register, so every waiting one is failed here
                self._closed = True
                pending, self._pending = self._pending, {}
            for future in pending.values():
                future.set_exception(self._gone())
            self._proc.kill()  # a helper whose replies cannot be read is of no use

    def _gone(self) -> KatError:
        return KatError(f"the code sandbox's launcher process exited (rc={self._proc.poll()}); the next run "
                        "starts a new one")

    def close(self) -> None:
        """End-of-file for the launcher: it finishes what runs and exits."""
        try:
            self._proc.stdin.close()  # type: ignore[union-attr]
            self._proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()


def serve(handler: Callable[..., Any]) -> None:
    """The helper's side: answer each call from stdin with `handler(name, *args)` on stdout, until
    end-of-file."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever else writes to stdout must not corrupt the replies
    requests = sys.stdin.buffer
    lock = threading.Lock()

    def answer(call_id: int, name: str, args: tuple) -> None:
        try:
            reply = (call_id, True, handler(name, *args))
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

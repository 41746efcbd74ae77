"""What several test modules share: running the `kat` command, a free port, a moto S3 server on loopback."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KAT = [sys.executable, "-m", "kat_app.cli"]


def kat(*args, env=None, timeout=600, cwd=None, **kw) -> subprocess.CompletedProcess:
    """`kat ARGS` in a subprocess of this interpreter (one thread per op: the machine is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*KAT, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=cwd or ROOT, **kw)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def moto_server():
    """A moto S3 server on loopback (started); `.get_host_and_port()`, `.stop()`."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    return server

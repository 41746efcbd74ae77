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


def kat_here(*args, env=None):
    """`kat ARGS` in this process (what `main` does: one `error:` line and exit code 1 for a user error,
    2 for a usage error): stdout, stderr and the exit code, as `kat` would give them, without starting a
    Python. For argument and error checks; real subprocesses stay for exit codes and start-up time."""
    import contextlib
    import io
    from types import SimpleNamespace

    from kat_app.cli import main
    from kat_core.util import patched_env

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with patched_env({k: str(v) for k, v in (env or {}).items()}), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


# the smoke pipeline at its smallest: every stage runs, each for a few steps (what a test of the platform
# around the pipeline needs; the stages' own behaviour is tested on their own)
FAST = ["train.steps=6", "train.checkpoint_every=6", "coldstart.prompts=6", "coldstart.k=1",
        "coldstart.max_new_tokens=16", "coldstart.train.steps=2", "srpo.train.steps=1", "srpo.prompts_per_step=2",
        "srpo.group_size=2", "srpo.max_new_tokens=16", "evaluate.limit=5", "evaluate.max_new_tokens=16",
        "evaluate.n_samples=0",
        # a few steps learn nothing: the promotion gate's floors would (rightly) keep every such model from
        # champion; these runs exercise the promotion plumbing, so the floors are off
        "registry.min_accuracy=0", "registry.min_well_formed=0"]

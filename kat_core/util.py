"""Small helpers every layer shares: atomic file writes, a temporary environment, a process check.

Nothing half-written is left where a reader would take it as complete: `atomic_write` writes a temp file
beside the target and renames it over (a rename is atomic within a file system)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: str | bytes, *, mode: int = 0o644) -> Path:
    """Write `data` to `path` through a temp file in the same directory, then rename it into place; the
    file gets permissions `mode` (0o600 for secrets). Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.chmod(tmp, mode)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2, **dump: Any) -> Path:
    """`data` as JSON (one trailing newline) at `path`, written atomically."""
    return atomic_write(path, json.dumps(data, indent=indent, **dump) + "\n")


@contextlib.contextmanager
def patched_env(env: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the length of a block (child processes inherit them); each is put
    back as it was afterwards (removed if it was unset)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pid_alive(pid: int | None) -> bool:
    """Whether process `pid` still runs (a zombie child of ours counts as ended)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def cpu_threads(threads: int | None = None) -> int:
    """The one CPU thread policy of every stage (training, sampling, evaluation, serving): `threads` when given,
    else $KAT_TORCH_THREADS, else $OMP_NUM_THREADS (a launcher's choice), else 1; returns the count.

    Why 1: on the shared 2-core machine (load 4-5), one thread ran a demo-size training step 7x faster than two
    (0.52 vs 3.64 s), its 8x32-token rollout 18x faster (0.36 vs 6.63 s), a SmolLM2-135M training step 2x
    (46.6 vs 92.4 s); evaluation and serving already decoded on one. Set KAT_TORCH_THREADS on an idle
    many-core CPU. Applied to torch now when it is imported, else through OMP_NUM_THREADS when it is."""
    import sys

    if threads is None:
        name = "KAT_TORCH_THREADS" if os.environ.get("KAT_TORCH_THREADS") else "OMP_NUM_THREADS"
        try:
            threads = int(os.environ.get(name) or 1)
        except ValueError:  # a typo in the environment: one line, not a traceback from every stage
            from kat_core.errors import KatError

            raise KatError(f"{name}={os.environ[name]!r} is not a whole number of threads") from None
    threads = max(1, threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


_SHORT_LIVED_GC: list[bool] = []
GC_THRESHOLD0 = 50_000  # net allocations between the collector's passes over the youngest generation (Python: 700)


def short_lived_gc() -> None:
    """The garbage collector's settings for a short-lived process (a stage, a `kat` command) that imports torch,
    transformers and mlflow: far fewer passes while it starts, none over everything at exit.

    - Collections run every 50 000 net allocations instead of 700. Start-up imports create over a million
      objects, and each pass of the oldest generation walks all of them: ~0.6 s of a stage's ~6 s of imports.
      Garbage held in reference cycles is collected later, not never.
    - Python's shutdown clears the modules and runs the cyclic collector over all the objects left: with torch,
      transformers and mlflow imported, over half a million, 2-3 s at the end of every pipeline stage on the
      loaded 2-core machine (0.4 s with this). An exit handler freezes them instead (gc.freeze: the collector no
      longer looks at them). The exit handlers still run (logging's, MLflow's, tempfile's), objects freed by
      reference counting still are; only objects held in reference cycles at exit are not finalized, which
      Python does not promise at exit anyway."""
    import atexit
    import gc

    if not _SHORT_LIVED_GC:
        _SHORT_LIVED_GC.append(True)
        gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])
        atexit.register(gc.freeze)

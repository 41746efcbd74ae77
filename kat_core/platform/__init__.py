"""The platform layer under the pipeline: MLflow tracking and lineage (`tracking`), the model registry with
its promotion gate (`registry`, `pyfunc_model`) and object storage over the S3 API (`storage`).

Nothing here imports mlflow or minio at module level, so the CLI stays instant.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def default_home() -> Path:
    """Where KAT_HOME is when the environment does not say: the `.kat` of the source checkout this code runs
    from (where `make run` leaves it), else `~/.kat` (an installed package). Never relative to the working
    directory, so `kat runs list` finds the same runs from any folder."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "kat_core").is_dir():
        return root / ".kat"
    return Path.home() / ".kat"


def kat_home() -> Path:
    """The platform's local state (MLflow database, pipeline root, locks): `$KAT_HOME`, else `default_home()`."""
    home = Path(os.environ["KAT_HOME"]).expanduser() if os.environ.get("KAT_HOME") else default_home()
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


@contextmanager
def file_lock(name: str) -> Iterator[None]:
    """An exclusive flock on $KAT_HOME/locks/<name>.lock, for processes (and threads: each open() is its own
    lock holder) sharing KAT_HOME; the kernel releases it if the holder dies."""
    import fcntl

    locks = kat_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    with open(locks / f"{safe}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

"""Where the public benchmark files are: `benchmarks_dir` option, else $KAT_BENCHMARKS_DIR, else
`../shared/benchmarks` next to the project root (or the current directory)."""

from __future__ import annotations

import os
from pathlib import Path

from kat_core.errors import KatError

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def candidate_dirs(benchmarks_dir: str | os.PathLike | None = None) -> list[Path]:
    if benchmarks_dir:
        return [Path(benchmarks_dir)]
    if os.environ.get("KAT_BENCHMARKS_DIR"):
        return [Path(os.environ["KAT_BENCHMARKS_DIR"])]
    return [_PROJECT_ROOT.parent / "shared" / "benchmarks", Path.cwd().parent / "shared" / "benchmarks"]


def benchmark_file(filename: str, benchmarks_dir: str | os.PathLike | None = None) -> Path:
    """The path of a benchmark file, or a KatError saying where it was looked for and how to point elsewhere."""
    dirs = candidate_dirs(benchmarks_dir)
    for d in dirs:
        if (d / filename).is_file():
            return d / filename
    looked = ", ".join(str(d / filename) for d in dirs)
    raise KatError(
        f"benchmark file {filename} not found (looked for {looked}); "
        "set KAT_BENCHMARKS_DIR or --set tasks.benchmarks_dir=DIR"
    )

"""The AutoThink pipeline on the local back end (kfp.local): wall time per stage and in total for a first
run, against a second identical run served from the cache.

Each repeat uses a fresh KAT_HOME (so its first run really runs), then runs the same config again. The
table shows the median over repeats; stage times are the back end's (task start to end, as `kat runs
show` reports them), the total is the wall time of the whole `submit` call (config, DAG build, kfp.local).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pipeline.py [--profile smoke|demo] [--repeats 1]
                                                                    [--set key=value ...]

Targets on 2 cores: smoke <= 120 s, demo <= 900 s, cached rerun <= 10% of the first.
The last line is `ratio cached/first total_s: X`.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.local import LocalBackend  # noqa: E402 (after the path fix, for a plain `python benchmarks/...`)


def one_run(home: Path, profile: str, overrides: list[str]) -> tuple[float, dict[str, tuple[str, float]]]:
    backend = LocalBackend(home=home)
    t0 = time.perf_counter()
    run_id = backend.submit(profile, overrides)
    total = time.perf_counter() - t0
    info = backend.status(run_id)
    if info.status != "succeeded":
        raise SystemExit(f"run {run_id} {info.status}: {info.error}; log {info.log}")
    return total, {s.name: (s.status, s.seconds or 0.0) for s in info.stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = ap.parse_args()

    firsts, cached = [], []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="kat-bench-") as tmp:
            firsts.append(one_run(Path(tmp), args.profile, args.overrides))
            cached.append(one_run(Path(tmp), args.profile, args.overrides))
        print(f"repeat {i + 1}/{args.repeats}: first {firsts[-1][0]:.1f}s, cached {cached[-1][0]:.1f}s",
              file=sys.stderr)

    def median_stage(runs: list, stage: str) -> float:
        return statistics.median(r[1][stage][1] for r in runs)

    stages = list(firsts[0][1])
    print(f"pipeline on the local back end, profile {args.profile} {' '.join(args.overrides)}".rstrip()
          + f", median of {args.repeats}")
    print(f"{'stage':<20} {'first_s':>10} {'cached_s':>10}  cached run status")
    for stage in stages:
        print(f"{stage:<20} {median_stage(firsts, stage):>10.2f} {median_stage(cached, stage):>10.2f}  "
              f"{cached[0][1][stage][0]}")
    first_total = statistics.median(r[0] for r in firsts)
    cached_total = statistics.median(r[0] for r in cached)
    print(f"{'total (wall)':<20} {first_total:>10.2f} {cached_total:>10.2f}")
    print(f"ratio cached/first total_s: {cached_total / first_total:.4g}")


if __name__ == "__main__":
    main()

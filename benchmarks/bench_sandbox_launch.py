"""Where sandboxed code is forked from: a launcher process (the default) against the calling process.

The sandbox's children need a fork (they confine themselves between fork and exec), and fork() copies the
caller's page tables. The callers that verify code are big: an evaluation or the RL stage holds torch and a
model, a test worker holds everything. This benchmark makes itself such a caller (torch and transformers
imported, `--hold-mb` of tensors touched) and verifies the same reference solutions both ways, interleaved
(in-process, launcher, in-process, ...), `--workers` at a time like the evaluation does.

    .venv/bin/python benchmarks/bench_sandbox_launch.py [--items 40 --hold-mb 1500 --workers 2]

The last line is `ratio launcher/in_process s_per_item: X` (wall seconds per verified item).
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kat_core.tasks import sandbox  # noqa: E402
from kat_core.tasks.code import MBPP, HumanEval  # noqa: E402


def sweep(pairs, workers: int) -> tuple[float, int]:
    """(wall seconds, references passed) for verifying every pair, `workers` at a time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        passed = sum(r.passed for r in pool.map(lambda p: p[0].run(p[1], p[1].answer), pairs))
    return time.perf_counter() - start, passed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=40, help="reference solutions, half from each benchmark")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each way")
    ap.add_argument("--hold-mb", type=int, default=1500, help="memory the caller holds, like a loaded model")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import transformers  # noqa: F401  (a stage's imports, as big as a stage's)

    held = torch.ones(args.hold_mb * (1 << 20) // 4)  # touched pages, as a model's weights are
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    humaneval, mbpp = HumanEval(), MBPP()
    rng = random.Random(args.seed)
    half = args.items // 2
    pairs = ([(humaneval, i) for i in rng.sample(humaneval.examples(), half)]
             + [(mbpp, i) for i in rng.sample([i for i in mbpp.examples() if i.id != "mbpp/123"], args.items - half)])

    figures: dict[str, list[float]] = {"in_process": [], "launcher": []}
    passed: dict[str, int] = {"in_process": 0, "launcher": 0}
    for way in figures:  # warm-up: the probes, the launchers' start
        sandbox.configure(launcher=way == "launcher")
        sweep(pairs[:4], args.workers)
    for _ in range(args.rounds):
        for way in figures:
            sandbox.configure(launcher=way == "launcher")
            wall, ok = sweep(pairs, args.workers)
            figures[way].append(wall / len(pairs))
            passed[way] += ok
    sandbox.configure()

    print(f"\n{len(pairs)} reference solutions, {args.workers} at a time, {args.rounds} interleaved rounds; "
          f"caller holds {held.numel() * 4 >> 20} MB (max RSS {rss_mb:.0f} MB)")
    print(f"{'forked from':<12} {'s_per_item':>11} {'passed':>10}")
    for way, walls in figures.items():
        print(f"{way:<12} {statistics.median(walls):>11.4f} {passed[way]:>5}/{len(pairs) * args.rounds}")
    ratio = statistics.median(figures["launcher"]) / statistics.median(figures["in_process"])
    print(f"ratio launcher/in_process s_per_item: {ratio:.2f}")


if __name__ == "__main__":
    main()

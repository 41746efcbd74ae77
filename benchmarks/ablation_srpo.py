"""Ablation: Step-SRPO against its baselines (grpo, decoupled), all from the same cold-start checkpoint with
the same seeds, evaluated on the held-out arith split (greedy, auto mode, plus both forced modes).

    .venv/bin/python benchmarks/ablation_srpo.py [--model DIR] [--data DIR] [--profile demo] [--seeds 0 1 2]
                                                 [--set key=value ...]

Defaults: the cold-start checkpoint and dataset of the last `make run` (.kat/make-run/coldstart and
.kat/make-run/synthesize). One row per (algorithm, seed) and one for the cold start itself: auto accuracy,
forced think-on accuracy, mean tokens (auto, and as a share of forced think-on), think-on rate per level,
and whether the mode policy collapsed (auto picks one mode on >= 98% of the items of every level).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

ALGOS = ("step_srpo", "grpo", "decoupled")


def evaluate_model(model_dir: Path, out: Path, limit: int, seed: int) -> dict:
    from kat_core.eval.evaluate import evaluate

    return evaluate(model_dir, ["arith"], out_dir=out, limit=limit, n_samples=0, seed=seed, progress=False)


def row(name: str, seed: int | str, report: dict, seconds: float) -> dict:
    o = report["overall"]
    levels = report["suites"]["arith"]["levels"]
    on_rates = {lvl: v["auto"]["think_on_rate"] for lvl, v in sorted(levels.items())}
    collapsed = all(r >= 0.98 for r in on_rates.values()) or all(r <= 0.02 for r in on_rates.values())
    return {
        "algo": name, "seed": seed,
        "acc_auto": o["auto"]["accuracy"]["greedy"], "acc_on": o["on"]["accuracy"]["greedy"],
        "tokens": o["auto"]["mean_tokens"]["total"], "tokens_on": o["on"]["mean_tokens"]["total"],
        "think_on": o["auto"]["think_on_rate"], "levels": on_rates, "collapsed": collapsed, "seconds": seconds,
    }


def print_table(rows: list[dict]) -> None:
    levels = list(rows[0]["levels"])
    head = ["algorithm", "seed", "acc auto", "acc on", "tokens", "tok/on", "think-on"] + [f"L{x}" for x in levels]
    print("| " + " | ".join(head + ["collapsed", "train s"]) + " |")
    print("|" + "---|" * (len(head) + 2))
    for r in rows:
        cells = [r["algo"], str(r["seed"]), f"{r['acc_auto']:.3f}", f"{r['acc_on']:.3f}", f"{r['tokens']:.1f}",
                 f"{r['tokens'] / r['tokens_on']:.2f}", f"{r['think_on']:.2f}"]
        cells += [f"{r['levels'][x]:.2f}" for x in levels]
        cells += ["yes" if r["collapsed"] else "no", f"{r['seconds']:.0f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path(".kat/make-run/coldstart"), help="cold-start checkpoint")
    ap.add_argument("--data", type=Path, default=Path(".kat/make-run/synthesize"), help="dataset directory")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    ap.add_argument("--limit", type=int, default=200, help="held-out items evaluated")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    from kat_core.config import load_config
    from kat_core.errors import KatError
    from kat_core.model.checkpoint import check_checkpoint
    from kat_core.train.srpo import srpo

    try:
        check_checkpoint(args.model)
        if not args.data.is_dir():
            raise KatError(f"no dataset at {args.data} (run `make run` first, or give --data)")
    except KatError as e:
        sys.exit(f"error: {e}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows.append(row("cold start", "-", evaluate_model(args.model, root / "eval-cold", args.limit, 0), 0.0))
        print_table(rows)
        for seed in args.seeds:
            for algo in args.algos:
                config = load_config(args.profile, [f"seed={seed}", f"srpo.algo={algo}", *args.overrides])
                out = root / f"{algo}-{seed}"
                t0 = time.perf_counter()
                srpo(config, args.model, args.data, out, progress=False)
                seconds = time.perf_counter() - t0
                report = evaluate_model(out, root / f"eval-{algo}-{seed}", args.limit, 0)
                rows.append(row(algo, seed, report, seconds))
                print(f"{algo} seed {seed}: done in {seconds:.0f} s", flush=True)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()

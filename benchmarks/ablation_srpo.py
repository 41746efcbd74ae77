"""Ablation: paired-mode Step-SRPO against its baselines (grpo, decoupled, adaptthink), all from the same
cold-start checkpoint with the same seeds, evaluated on held-out arith items (greedy; auto and both forced
modes), with the decision criterion's two oracles.

    .venv/bin/python benchmarks/ablation_srpo.py [--model DIR] [--data DIR] [--profile demo] [--seeds 0 1 2]
                                                 [--algos step_srpo grpo] [--limit 500] [--eval-seed 0]
                                                 [--oracle-items 1500]
                                                 [--set key=value ...]

Defaults: the cold-start checkpoint and dataset of the last `make run` (.kat/make-run/coldstart and
.kat/make-run/synthesize). One row per (algorithm, seed) and one for the cold start itself: auto accuracy,
forced think-on accuracy, auto tokens as a share of forced think-on's, the feature-cell oracle's tokens
(same share) and auto's value regret against it, think-on rate per level, and the issue's checks per row
(auto accuracy >= think-on - 0.01, tokens <= 0.70 x think-on, within 0.03 x think-on of the feature-cell
oracle, regret <= the cold start's; and, for reference, within 0.03 x of the sign-rule cell oracle, which
decides each cell by the sign of its mean alone). The feature-cell oracle decides its cells on `--oracle-items`
(1500) other test items each model answers in both forced modes, so that a cell's verdict is not one 500-item
split's noise; "split-cell tok/on" is the same oracle decided on the evaluated split alone. Then, per algorithm,
the spread of each level's think-on rate across seeds. Ends with `ratio step_srpo/cold_start value_regret: X`
(mean over seeds).

The demo profile sets `srpo.decision_weight: 0` (the RL keeps the cold start's decisions; README): to ablate the
decision losses of step_srpo and adaptthink, give the weight, e.g. `--set srpo.decision_weight=0.3`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


def evaluate_model(model_dir: Path, out: Path, limit: int, seed: int, criterion, oracle_items: int) -> dict:
    from kat_core.eval.evaluate import evaluate

    return evaluate(model_dir, ["arith"], out_dir=out, limit=limit, n_samples=0, seed=seed, criterion=criterion,
                    oracle_items=oracle_items, progress=False)


def row(name: str, seed: int | str, report: dict, seconds: float) -> dict:
    o = report["overall"]
    levels = report["suites"]["arith"]["levels"]
    sel = report["mode_selection"]
    tokens_on = o["on"]["mean_tokens"]["total"]
    return {
        "algo": name, "seed": seed,
        "acc_auto": o["auto"]["accuracy"]["greedy"], "acc_on": o["on"]["accuracy"]["greedy"],
        "acc_off": o["off"]["accuracy"]["greedy"],
        "tok_share": o["auto"]["mean_tokens"]["total"] / tokens_on,
        "cell_share": sel["feature_cell"]["oracle"]["mean_tokens"] / tokens_on,
        "hind_share": sel["oracle"]["mean_tokens"] / tokens_on,
        "cell_acc": sel["feature_cell"]["oracle"]["accuracy"],
        # the cells decided on the split's own items (when the oracle was decided on calibration items), and by
        # the sign of each cell's mean alone (no tie band): it also knows the split's single misses
        "split_share": sel["feature_cell"].get("in_split", sel["feature_cell"])["oracle"]["mean_tokens"] / tokens_on,
        "sign_share": sel["feature_cell"]["sign_rule"]["oracle"]["mean_tokens"] / tokens_on,
        "regret": sel["feature_cell"]["regret"]["value"],
        "levels": {lvl: v["auto"]["think_on_rate"] for lvl, v in sorted(levels.items())},
        "disagree": [(cell, c) for cell, c in sel["feature_cell"].get("by_cell", {}).items()
                     if abs(c["auto_think_on_rate"] - (c["oracle"] == "on")) >= 0.25],
        "seconds": seconds,
    }


def checks(r: dict, cold_regret: float) -> str:
    ok = [r["acc_auto"] >= r["acc_on"] - 0.01, r["tok_share"] <= 0.70, abs(r["tok_share"] - r["cell_share"]) <= 0.03,
          r["regret"] <= cold_regret + 1e-9, abs(r["tok_share"] - r["sign_share"]) <= 0.03]
    return "".join("y" if x else "n" for x in ok)


def print_table(rows: list[dict]) -> None:
    levels = list(rows[0]["levels"])
    head = ["algorithm", "seed", "acc auto", "acc on", "acc off", "tok/on", "cell tok/on", "cell acc", "regret",
            "split-cell tok/on", "sign tok/on"]
    head += [f"L{x} on" for x in levels] + ["checks", "train s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    cold = rows[0]["regret"]
    for r in rows:
        cells = [r["algo"], str(r["seed"]), f"{r['acc_auto']:.3f}", f"{r['acc_on']:.3f}", f"{r['acc_off']:.3f}",
                 f"{r['tok_share']:.2f}", f"{r['cell_share']:.2f}", f"{r['cell_acc']:.3f}", f"{r['regret']:.4f}",
                 f"{r['split_share']:.2f}", f"{r['sign_share']:.2f}"]
        cells += [f"{r['levels'][x]:.2f}" for x in levels]
        cells += [checks(r, cold), f"{r['seconds']:.0f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    print("checks: auto acc >= on - 0.01 | tokens <= 0.70 x on | within 0.03 x on of the feature-cell oracle | "
          "regret <= cold start's | (for reference) within 0.03 x on of the sign-rule cell oracle", flush=True)


def print_disagreements(r: dict) -> None:
    """The feature cells where auto's think-on rate is >= 0.25 away from the cell oracle's mode."""
    for cell, c in r["disagree"]:
        print(f"  {r['algo']} {r['seed']}: {cell!r} (n {c['n']}): oracle {c['oracle']} "
              f"(mean V_off - V_on + delta {c['mean_preference_off']:+.3f} +- {c['error']:.3f}), auto thinks on "
              f"{c['auto_think_on_rate']:.2f}",
              flush=True)


def print_spread(rows: list[dict]) -> None:
    """Per algorithm: each level's think-on rate range across seeds."""
    by_algo: dict[str, list[dict]] = {}
    for r in rows[1:]:
        by_algo.setdefault(r["algo"], []).append(r)
    for algo, rs in by_algo.items():
        if len(rs) < 2:
            continue
        spread = {lvl: max(r["levels"][lvl] for r in rs) - min(r["levels"][lvl] for r in rs) for lvl in rs[0]["levels"]}
        print(f"{algo}: think-on rate spread across {len(rs)} seeds: "
              + ", ".join(f"L{lvl} {v:.2f}" for lvl, v in spread.items()), flush=True)


def main() -> None:
    from kat_core.train.srpo import ALGOS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path(".kat/make-run/coldstart"), help="cold-start checkpoint")
    ap.add_argument("--data", type=Path, default=Path(".kat/make-run/synthesize"), help="dataset directory")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    ap.add_argument("--limit", type=int, default=500, help="held-out items evaluated")
    ap.add_argument("--eval-seed", type=int, default=0, help="which held-out items (the test split's seed)")
    ap.add_argument("--oracle-items", type=int, default=1500, help="other test items each model answers in both "
                    "forced modes, on which the feature-cell oracle decides its cells (0: on the evaluated split)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    from kat_core.config import load_config
    from kat_core.errors import KatError
    from kat_core.model.checkpoint import check_checkpoint
    from kat_core.train.srpo import srpo
    from kat_core.util import cpu_threads

    cpu_threads()  # the stages' thread policy: two runs side by side on 2 cores would otherwise fight over them
    try:
        check_checkpoint(args.model)
        if not args.data.is_dir():
            raise KatError(f"no dataset at {args.data} (run `make run` first, or give --data)")
        criterion = load_config(args.profile, args.overrides).autothink
    except KatError as e:
        sys.exit(f"error: {e}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows.append(row("cold start", "-", evaluate_model(args.model, root / "eval-cold", args.limit, args.eval_seed,
                                                          criterion, args.oracle_items), 0.0))
        print_table(rows)
        print_disagreements(rows[0])
        for seed in args.seeds:
            for algo in args.algos:
                config = load_config(args.profile, [f"seed={seed}", f"srpo.algo={algo}", *args.overrides])
                out = root / f"{algo}-{seed}"
                t0 = time.perf_counter()
                srpo(config, args.model, args.data, out, progress=False)
                seconds = time.perf_counter() - t0
                report = evaluate_model(out, root / f"eval-{algo}-{seed}", args.limit, args.eval_seed, criterion,
                                        args.oracle_items)
                rows.append(row(algo, seed, report, seconds))
                print(f"{algo} seed {seed}: done in {seconds:.0f} s", flush=True)
                print_table(rows[:1] + rows[-1:])  # the row so far, under the cold start's
                print_disagreements(rows[-1])
    print()
    print_table(rows)
    print_spread(rows)
    ours = [r["regret"] for r in rows if r["algo"] == "step_srpo"]
    if ours:
        cold, mean = rows[0]["regret"], statistics.mean(ours)
        # a cold start with no regret at all leaves the ratio undefined: 1 when the RL kept it at 0, else inf
        ratio = mean / cold if cold > 1e-9 else (1.0 if mean <= 1e-9 else float("inf"))
        print(f"ratio step_srpo/cold_start value_regret: {ratio:.3f}")


if __name__ == "__main__":
    main()

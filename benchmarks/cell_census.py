"""How noisy is a feature-cell oracle on a finite split? Measure a checkpoint's both forced modes (greedy) on many
fresh held-out arith items, then resample evaluation-sized splits from them.

    .venv/bin/python benchmarks/cell_census.py [--model DIR] [--items 2500] [--seed 7] [--split-items 500]
                                               [--splits 400] [--profile demo] [--set key=value ...]

Per feature cell: items, forced accuracies and tokens, the mean preference `V_off - V_on + delta` with its
standard error, and the mode by the criterion's cell rule (ties within `autothink.tie_z` standard errors go
to think-off) and by the sign of the mean alone. Then, taking every cell's mode on all the measured items as
the population's (the best a selector can do), it draws `--splits` splits of `--split-items` items (evenly over
the levels, with replacement) and counts how often each rule's cell oracle, decided on the split alone, sits
more than 0.03 x forced think-on tokens away from that selector (the issue-16 line). Ends with
`ratio tie_rule/sign_rule token_line_misses: X`.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import warnings
from collections import defaultdict
from pathlib import Path


def measure(model_dir: Path, n: int, seed: int, criterion) -> list[dict]:
    """Both forced modes of `n` fresh test items -> per item: cell, level, preference_off, tokens per mode."""
    from kat_core.autothink import cell_of, preference_off
    from kat_core.config import ColdStartConfig
    from kat_core.model.checkpoint import load_checkpoint
    from kat_core.tasks.arith import ArithTask
    from kat_core.train.coldstart import sample_both_modes

    task = ArithTask()
    items = task.examples("test", n=n, seed=seed)
    model, tokenizer, _ = load_checkpoint(model_dir)
    model.eval()
    rows = sample_both_modes(model, tokenizer, [(task, it) for it in items], ColdStartConfig(), criterion, seed)
    return [{"cell": cell_of(task.intent_features(it)), "level": it.difficulty,
             "pref": preference_off((r["acc_off"], r["tokens_off"]), (r["acc_on"], r["tokens_on"]), criterion),
             "acc_off": r["acc_off"], "acc_on": r["acc_on"], "tokens_off": r["tokens_off"], "tokens_on": r["tokens_on"]}
            for it, r in zip(items, rows, strict=True)]


def tally_rows(rows: list[dict]):
    """The measured items as CellTally takes them: (cell, level, preference_off, accuracy_on - accuracy_off)."""
    return ((r["cell"], r["level"], r["pref"], r["acc_on"] - r["acc_off"]) for r in rows)


def modes_of(rows: list[dict], min_cell: int, tie_z: float, accuracy_first: bool = True) -> dict[str, str]:
    from kat_core.autothink import cell_tally
    from kat_core.config import AutoThinkConfig

    crit = AutoThinkConfig(min_cell=min_cell, tie_z=tie_z, accuracy_first=accuracy_first)
    return cell_tally(tally_rows(rows), crit).modes()


def token_gap(split: list[dict], oracle: dict[str, str], selector: dict[str, str]) -> float:
    """|selector's mean tokens - oracle's| / forced think-on's mean tokens, on one split."""
    tokens = lambda modes: sum(r[f"tokens_{modes[r['cell']]}"] for r in split)  # noqa: E731
    return abs(tokens(selector) - tokens(oracle)) / sum(r["tokens_on"] for r in split)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path(".kat/make-run/srpo"), help="checkpoint to measure")
    ap.add_argument("--items", type=int, default=2500, help="fresh test items asked for (a level whose test "
                    "expressions run out gives fewer)")
    ap.add_argument("--seed", type=int, default=7, help="which fresh items (not the evaluation's seed 0)")
    ap.add_argument("--split-items", type=int, default=500, help="items per resampled split")
    ap.add_argument("--splits", type=int, default=400)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    from kat_core.autothink import cell_tally
    from kat_core.config import load_config
    from kat_core.errors import KatError
    from kat_core.model.checkpoint import check_checkpoint
    from kat_core.util import cpu_threads

    cpu_threads()
    try:
        check_checkpoint(args.model)
        crit = load_config(args.profile, args.overrides).autothink
    except KatError as e:
        sys.exit(f"error: {e}")
    rows = measure(args.model, args.items, args.seed, crit)
    tally = cell_tally(tally_rows(rows), crit)
    by_cell: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_cell[r["cell"]].append(r)
    print(f"{len(rows)} fresh test items (seed {args.seed}) of {args.model}; tie rule: z {crit.tie_z}, "
          f"min_cell {crit.min_cell}")
    print("| feature cell | items | acc off | acc on | tokens off | tokens on | mean V_off - V_on + delta | "
          "tie rule | sign |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for cell, info in tally.summary().items():
        rs = by_cell[cell]
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731, B023
        print(f"| {cell} | {info['n']} | {mean('acc_off'):.3f} | {mean('acc_on'):.3f} | {mean('tokens_off'):.1f} | "
              f"{mean('tokens_on'):.1f} | {info['mean']:+.3f} +- {info['error']:.3f} | {info['mode']} | "
              f"{'off' if info['mean'] >= 0 else 'on'} |")

    # the selector: every cell's mode on all the items
    population = modes_of(rows, crit.min_cell, crit.tie_z, crit.accuracy_first)
    by_level: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_level[r["level"]].append(r)
    per_level = args.split_items // len(by_level)
    rng = random.Random(args.seed)
    misses = {"tie rule": 0, "sign rule": 0}
    for _ in range(args.splits):
        split = [r for lvl in sorted(by_level) for r in rng.choices(by_level[lvl], k=per_level)]
        for name, (min_cell, tie_z) in {"tie rule": (crit.min_cell, crit.tie_z), "sign rule": (1, 0.0)}.items():
            misses[name] += token_gap(split, modes_of(split, min_cell, tie_z, crit.accuracy_first), population) > 0.03
    print(f"{args.splits} splits of {per_level * len(by_level)} items: the cell oracle more than 0.03 x think-on "
          f"tokens from the population's selector: tie rule {misses['tie rule']}, sign rule {misses['sign rule']}")
    print(f"ratio tie_rule/sign_rule token_line_misses: {misses['tie rule'] / max(misses['sign rule'], 1):.3f}")


if __name__ == "__main__":
    main()

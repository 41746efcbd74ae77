"""After cold start: does the model's unforced mode choice agree with the majority-vote label on held-out
prompts? (issue target: >= 80%)

For each held-out arith test prompt: k forced samples per mode give the majority-vote label (the same rule
and settings the cold start uses); one greedy unforced sample gives the model's own choice.

    .venv/bin/python benchmarks/coldstart_agreement.py MODEL_DIR [--n 200 --profile demo --threads 2]

Prints a per-level table and a last line `agreement unforced/majority_vote: X`.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from kat_core.config import load_config
    from kat_core.format import parse
    from kat_core.model.checkpoint import load_checkpoint
    from kat_core.rollout import generate
    from kat_core.tasks.arith import ArithTask
    from kat_core.train.coldstart import majority_vote, sample_both_modes

    cfg = load_config(args.profile)
    model, tokenizer, _ = load_checkpoint(args.model)
    model.eval()
    task = ArithTask()
    items = task.examples("test", n=args.n, seed=1)
    pairs = [(task, item) for item in items]
    sampled = sample_both_modes(model, tokenizer, pairs, cfg.coldstart, seed=1)
    unforced = generate(model, tokenizer, [i.prompt for i in items], temperature=0,
                        max_new_tokens=cfg.coldstart.max_new_tokens)
    per_level: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # agree, total, chose on
    for item, row, sample in zip(items, sampled, unforced, strict=True):
        label = majority_vote(row["acc_off"], row["acc_on"], cfg.coldstart.delta)[0]
        chosen = parse(sample.text).mode
        cell = per_level[item.difficulty]
        cell[0] += chosen == label
        cell[1] += 1
        cell[2] += chosen == "on"
    print(f"{'level':>5s} {'prompts':>8s} {'agree':>6s} {'think-on rate':>14s}")
    for level, (agree, total, on) in sorted(per_level.items()):
        print(f"{level:5d} {total:8d} {agree / total:6.2f} {on / total:14.2f}")
    agree = sum(c[0] for c in per_level.values()) / sum(c[1] for c in per_level.values())
    print(f"agreement unforced/majority_vote: {agree:.3f}")


if __name__ == "__main__":
    sys.exit(main())

"""Pretraining recipes for the demo student, side by side: what each one buys in the forced modes' per-level
accuracy (greedy, held-out arith items) and what it costs in training compute.

    .venv/bin/python benchmarks/student_sweep.py [--variants FILE.yaml] [--only NAME ...] [--seeds 0 1]
                                                 [--jobs 4] [--limit 500] [--out DIR]

A variant is a name and `--set` overrides over the demo profile (FILE.yaml: a list of {name, set: [...]},
default: VARIANTS below). Each (variant, seed) runs in its own process: synthesize, train the teacher if the
recipe has one, pretrain (and distil) the student, evaluate it in auto, think-on and think-off. Results are
written as they finish (OUT/NAME-sSEED.json; `--table` prints them), so a cut-off run keeps what it measured.

Cost is counted in model work, not seconds (the sweep may run on another machine): token-positions processed x
trained parameters (MTP modules included), teacher included, relative to the distilled recipe the demo had
before this sweep (BASELINE, `cost` 1.00: 1347 s of pretraining with 2 threads on the 2-core machine). The
issue's targets per row: think-off >= 0.97 on at least three levels, think-on >= 0.95 on every level. Ends with
`best: NAME` (every seed meets the targets, lowest cost).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

# Variants are overrides on the demo profile; each states its steps, learning rate and teacher, so the list
# keeps its meaning when the profile changes. bf16 off everywhere: the 2-core machine trains in fp32.
FP32 = ["train.bf16=false", "pretrain.teacher_train.bf16=false"]
# The demo's recipe before this sweep: a 300-step teacher (2x the student), then 620 distilled student steps.
DISTILLED = ["pretrain.train_teacher=true", "pretrain.alpha=0.9",
             "pretrain.teacher_model={hidden_size: 192, num_heads: 6, intermediate_size: 512}",
             "pretrain.teacher_train={steps: 300, lr: 2.0e-3, weight_decay: 0.1}", "train.steps=620",
             "train.lr=2.0e-3"]
NO_TEACHER = ["pretrain.train_teacher=false", "train.steps=620", "train.lr=2.0e-3"]
BASELINE = "teacher300-student620"  # cost 1.00
VARIANTS: list[dict] = [
    {"name": "demo", "set": []},  # the profile as it is
    {"name": BASELINE, "set": DISTILLED},
    {"name": "teacher150-student620", "set": [*DISTILLED, "pretrain.teacher_train.steps=150"]},
    {"name": "teacher-pack160", "set": [*DISTILLED, "pretrain.pack_len=160", "pretrain.teacher_train.steps=600",
                                        "train.steps=1600"]},
    {"name": "noteacher", "set": NO_TEACHER},
    {"name": "noteacher-900", "set": [*NO_TEACHER, "train.steps=900"]},
    {"name": "noteacher-lr3e-3", "set": [*NO_TEACHER, "train.lr=3.0e-3"]},
    {"name": "noteacher-1200-lr3e-3", "set": [*NO_TEACHER, "train.steps=1200", "train.lr=3.0e-3"]},
    {"name": "noteacher-wd0.01", "set": [*NO_TEACHER, "train.weight_decay=0.01"]},
    {"name": "noteacher-pack160-1000", "set": [*NO_TEACHER, "pretrain.pack_len=160", "train.steps=1000"]},
    {"name": "noteacher-pack160-1600", "set": [*NO_TEACHER, "pretrain.pack_len=160", "train.steps=1600"]},
    {"name": "noteacher-mirror1", "set": [*NO_TEACHER, "synth.mirror_share=1.0"]},
    {"name": "noteacher-arith2000", "set": [*NO_TEACHER, "synth.families={arith: 2000}"]},
    {"name": "noteacher-arith8000", "set": [*NO_TEACHER, "synth.families={arith: 8000}"]},
    {"name": "noteacher-wide", "set": [*NO_TEACHER, "model.hidden_size=192", "model.num_heads=6",
                                       "model.intermediate_size=512"]},
    {"name": "noteacher-6layers", "set": [*NO_TEACHER, "model.num_layers=6"]},
    {"name": "noteacher-mtp0", "set": [*NO_TEACHER, "model.mtp_depth=0"]},
    {"name": "noteacher-mtp0-900", "set": [*NO_TEACHER, "model.mtp_depth=0", "train.steps=900"]},
    {"name": "noteacher-mtp0-1200-lr3e-3", "set": [*NO_TEACHER, "model.mtp_depth=0", "train.steps=1200",
                                                   "train.lr=3.0e-3"]},
    {"name": "noteacher-mtp0-pack160-1600", "set": [*NO_TEACHER, "model.mtp_depth=0", "pretrain.pack_len=160",
                                                    "train.steps=1600"]},
    {"name": "noteacher-mtp0-pack160-2400", "set": [*NO_TEACHER, "model.mtp_depth=0", "pretrain.pack_len=160",
                                                    "train.steps=2400"]},
    {"name": "noteacher-mtp0-pack160-1600-lr3e-3", "set": [*NO_TEACHER, "model.mtp_depth=0",
                                                           "pretrain.pack_len=160", "train.steps=1600",
                                                           "train.lr=3.0e-3"]},
    {"name": "noteacher-mtp0-pack160-1600-arith8000", "set": [*NO_TEACHER, "model.mtp_depth=0",
                                                              "pretrain.pack_len=160", "train.steps=1600",
                                                              "synth.families={arith: 8000}"]},
    {"name": "noteacher-mtp0-pack160-1600-mirror1", "set": [*NO_TEACHER, "model.mtp_depth=0",
                                                            "pretrain.pack_len=160", "train.steps=1600",
                                                            "synth.mirror_share=1.0"]},
]
OFF_MIN, ON_MIN, OFF_LEVELS = 0.97, 0.95, 3


def parameters(ckpt: Path) -> int:
    """Trained parameters of a checkpoint, its MTP modules included (they are trained on every step)."""
    from safetensors import safe_open

    from kat_core.model.checkpoint import MTP_WEIGHTS, checkpoint_meta

    total = checkpoint_meta(ckpt)["extra"]["parameters"]
    if (ckpt / MTP_WEIGHTS).is_file():
        with safe_open(str(ckpt / MTP_WEIGHTS), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def train_work(cfg, n_rows_tokens: int, params: int, teacher_params: int | None) -> float:
    """Token-positions x parameters of the pretraining, teacher included (its training and its one pass)."""
    student = cfg.train.steps * cfg.train.micro_batch_size * cfg.train.grad_accum * n_rows_tokens * params
    if teacher_params is None:
        return float(student)
    t = cfg.pretrain.teacher_train
    teacher = t.steps * t.micro_batch_size * t.grad_accum * n_rows_tokens * teacher_params
    return float(student + teacher)


def run_one(name: str, overrides: list[str], seed: int, work: Path, limit: int) -> dict:
    """One (variant, seed): synthesize, pretrain, evaluate in `work`; returns the result row."""
    from kat_core.config import load_config
    from kat_core.data.synth import synthesize
    from kat_core.eval.evaluate import evaluate
    from kat_core.train.pretrain import pack_len, pretrain

    cfg = load_config("demo", [*overrides, *FP32, f"seed={seed}"])
    started = time.perf_counter()
    synthesize(cfg, work / "data", progress=False)
    teacher_dir, teacher_params = None, None
    if cfg.pretrain.train_teacher:
        teacher_dir = work / "teacher"
        pretrain(cfg, work / "data", teacher_dir, model_cfg=cfg.pretrain.teacher_model,
                 train_cfg=cfg.pretrain.teacher_train, progress=False, stage="pretrain-teacher")
        teacher_params = parameters(teacher_dir)
    pretrain(cfg, work / "data", work / "student", teacher=teacher_dir, progress=False)
    train_s = time.perf_counter() - started
    params = parameters(work / "student")
    report = evaluate(work / "student", ["arith"], ["auto", "on", "off"], out_dir=work / "eval", limit=limit,
                      n_samples=0, seed=0, criterion=cfg.autothink, max_new_tokens=cfg.evaluate.max_new_tokens,
                      progress=False)
    suite = report["suites"]["arith"]
    levels = {lvl: {m: suite["levels"][lvl][m]["accuracy"]["greedy"] for m in ("on", "off", "auto")}
              for lvl in suite["levels"]}
    tokens = {m: suite["modes"][m]["mean_tokens"]["total"] for m in ("on", "off", "auto")}
    cell = (suite["mode_selection"] or {}).get("feature_cell", {}).get("oracle", {})
    return {
        "name": name, "seed": seed, "set": overrides, "train_s": round(train_s, 1),
        "work": train_work(cfg, pack_len(cfg, cfg.model), params, teacher_params),
        "levels": levels, "tokens": tokens,
        "cell_oracle": {"accuracy": cell.get("accuracy"),
                        "tokens_share": (cell.get("mean_tokens") or 0) / tokens["on"] if tokens["on"] else None},
        "auto_accuracy": suite["modes"]["auto"]["accuracy"]["greedy"],
    }


def meets(row: dict) -> bool:
    on = [v["on"] for v in row["levels"].values()]
    off = [v["off"] for v in row["levels"].values()]
    return min(on) >= ON_MIN and sum(a >= OFF_MIN for a in off) >= OFF_LEVELS


def print_table(rows: list[dict], baseline_work: float | None) -> None:
    print(f"{'variant':28} {'seed':>4} {'cost':>5}  {'think-on L1-L5':29}  {'think-off L1-L5':29}  "
          f"{'off/on tok':>10} {'cell tok':>8} {'meets':>5}")
    for r in sorted(rows, key=lambda r: (r["name"], r["seed"])):
        lv = [r["levels"][k] for k in sorted(r["levels"], key=int)]
        on = " ".join(f"{v['on']:.2f}" for v in lv)
        off = " ".join(f"{v['off']:.2f}" for v in lv)
        cost = f"{r['work'] / baseline_work:.2f}" if baseline_work else "?"
        share = r["tokens"]["off"] / r["tokens"]["on"]
        cell = r["cell_oracle"]["tokens_share"]
        print(f"{r['name']:28} {r['seed']:>4} {cost:>5}  {on:29}  {off:29}  {share:10.2f} "
              f"{cell if cell is None else round(cell, 2)!s:>8} {'yes' if meets(r) else 'no':>5}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", type=Path, help="YAML list of {name, set: [...]} (default: the built-in list)")
    ap.add_argument("--only", nargs="*", help="run only these variant names")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--jobs", type=int, default=1, help="variants trained at once (one process each)")
    ap.add_argument("--limit", type=int, default=500, help="held-out arith items evaluated")
    ap.add_argument("--out", type=Path, default=Path(".kat/student-sweep"), help="results and logs")
    ap.add_argument("--work", type=Path, help="datasets and checkpoints (default: OUT)")
    ap.add_argument("--table", action="store_true", help="only print the table of the results in OUT")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.variants:
        import yaml

        variants = yaml.safe_load(args.variants.read_text())
    else:
        variants = VARIANTS
    if args.only:
        unknown = set(args.only) - {v["name"] for v in variants}
        if unknown:
            sys.exit(f"error: unknown variant(s): {', '.join(sorted(unknown))}")
        variants = [v for v in variants if v["name"] in args.only]

    if args.one:
        variant = next(v for v in variants if v["name"] == args.one)
        key = f"{args.one}-s{args.seed}"
        row = run_one(variant["name"], variant["set"], args.seed, (args.work or args.out) / key, args.limit)
        (args.out / f"{key}.json").write_text(json.dumps(row, indent=1))
        return
    if args.table:
        return report(args.out)

    args.out.mkdir(parents=True, exist_ok=True)
    queue = [(v["name"], s) for s in args.seeds for v in variants]
    running: list[tuple[subprocess.Popen, str, int, float]] = []
    env = {**os.environ, "KAT_TORCH_THREADS": os.environ.get("KAT_TORCH_THREADS", "1")}
    while queue or running:
        while queue and len(running) < args.jobs:
            name, seed = queue.pop(0)
            log = (args.out / f"{name}-s{seed}.log").open("w")
            cmd = [sys.executable, __file__, "--one", name, "--seed", str(seed), "--out", str(args.out),
                   "--limit", str(args.limit)] + (["--variants", str(args.variants)] if args.variants else []) \
                + (["--work", str(args.work)] if args.work else [])
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), name, seed,
                            time.perf_counter()))
        time.sleep(2)
        for job in list(running):
            proc, name, seed, t0 = job
            if proc.poll() is not None:
                running.remove(job)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see its .log)"
                print(f"{name} seed {seed}: {status} in {time.perf_counter() - t0:.0f} s", flush=True)

    report(args.out)


def report(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*-s*.json"))]
    base = [r["work"] for r in rows if r["name"] == BASELINE]
    print_table(rows, base[0] if base else None)
    cost = {r["name"]: r["work"] for r in rows}
    passing = [n for n in cost if all(meets(r) for r in rows if r["name"] == n)]
    print(f"best: {min(passing, key=cost.get) if passing else 'none'}")


if __name__ == "__main__":
    main()

"""Pretraining step time, all measured in one run on the same model size, batch and sequence length:

  (a) a plain HF causal-LM loop (labels=..., no MTP, no KD)        the peer
  (b) ours, D=1 MTP module                                          target (b)/(a) <= 1.35
  (c) ours, D=2
  (d) ours, D=1 + KD from a teacher checkpoint (teacher forward included)
  (d') ours, D=1 + KD from the teacher's top-k, computed once over the rows (pretrain.teacher_once, the default)
  (e) the engine: DeepSpeed back end vs plain torch back end      target <= 1.15 (see also bench_engine.py)

(a)-(d) alternate step by step after a warm-up (so machine noise hits all alike); each figure is the median
step time (forward, backward, AdamW step). (e) runs full `train()` calls, alternating back ends.

    .venv/bin/python benchmarks/bench_pretrain.py [--profile demo --steps 12 --warmup 3 --threads 2]

The last lines are `ratio ours_d1/hf step_time: X` and `ratio deepspeed/torch step_time: Y`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from kat_core.config import load_config
    from kat_core.data.synth import synthesize
    from kat_core.model.lm import build_model
    from kat_core.model.mtp import LMWithMTP, build_mtp
    from kat_core.tokenizer import train_tokenizer
    from kat_core.train.pretrain import corpus, make_loss_fn, packed_rows, teacher_topk

    cfg = load_config(args.profile, ["synth.families={arith: 600}"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    synthesize(cfg, tmp / "data", progress=False)
    from kat_core.data.dataset import read_records

    records = read_records(tmp / "data")
    tok = train_tokenizer(corpus(records), vocab_size=cfg.model.vocab_size)
    rows = packed_rows(records, tok, cfg.model.max_seq_len, cfg.pretrain.mode_token_weight, 0)
    bs = cfg.train.micro_batch_size
    batch = {k: v[:bs] for k, v in rows.items()}
    labels = batch["input_ids"].masked_fill(batch["weights"] == 0, -100)

    def ours(depth: int, teacher=None, data=batch):
        model = LMWithMTP(build_model(cfg.model, tok), None)
        model.mtp = build_mtp(model.lm, depth)
        loss_fn = make_loss_fn(cfg, teacher)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss, _ = loss_fn(model, data)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def hf_plain():
        model = build_model(cfg.model, tok)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=labels,
                        use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    teacher = build_model(cfg.model.model_copy(update={"hidden_size": cfg.model.hidden_size * 2,
                                                       "intermediate_size": cfg.model.intermediate_size * 2}), tok)
    teacher.eval().requires_grad_(False)
    top = teacher_topk(teacher, batch, cfg.pretrain.teacher_top_k, cfg.pretrain.kd_temperature, progress=False)
    with_topk = {**batch, **{f"teacher_{k}": v for k, v in top.items()}}
    runs = {"(a) hf plain": hf_plain(), "(b) ours D=1": ours(1), "(c) ours D=2": ours(2),
            "(d) ours D=1 + KD": ours(1, teacher), "(d') D=1 + KD top-k once": ours(1, data=with_topk)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.warmup + args.steps):
        for name, step in runs.items():
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = int((batch["weights"] > 0).sum())
    student = sum(p.numel() for p in build_model(cfg.model, tok).parameters()) / 1e6
    print(f"student {student:.2f}M params; batch {bs}x{cfg.model.max_seq_len}, {tokens} trained tokens, "
          f"{args.threads} threads, median of {args.steps} steps")
    print(f"{'config':24s} {'step ms':>9s} {'tokens/s':>9s} {'vs (a)':>7s}")
    for k, v in med.items():
        print(f"{k:24s} {v * 1000:9.1f} {tokens / v:9.0f} {v / med['(a) hf plain']:7.2f}")

    engine = engine_ratio(cfg, tok, rows, tmp, args)
    print(f"(e) engine step ms: torch {engine['torch'] * 1000:.1f}, deepspeed {engine['deepspeed'] * 1000:.1f}")
    print(f"ratio ours_d1/hf step_time: {med['(b) ours D=1'] / med['(a) hf plain']:.3f}")
    print(f"ratio deepspeed/torch step_time: {engine['deepspeed'] / engine['torch']:.3f}")


def engine_ratio(cfg, tok, rows, tmp: Path, args) -> dict[str, float]:
    """Median step time of full engine runs, torch and DeepSpeed (ZeRO-0) alternating, 2 repeats each."""
    from kat_core.model.lm import build_model
    from kat_core.model.mtp import LMWithMTP, build_mtp
    from kat_core.train.engine import train
    from kat_core.train.pretrain import make_loss_fn

    bs = cfg.train.micro_batch_size
    steps = args.warmup + args.steps
    results: dict[str, list[float]] = {"torch": [], "deepspeed": []}
    for rep in range(2):
        for backend in ("torch", "deepspeed"):
            lm = build_model(cfg.model, tok)
            model = LMWithMTP(lm, build_mtp(lm, 1))
            tcfg = cfg.train.model_copy(update={"backend": backend, "steps": steps, "checkpoint_every": 10**6,
                                                "bf16": False})
            out = tmp / f"engine-{backend}-{rep}"
            train(model, make_loss_fn(cfg), lambda i: {k: v[:bs] for k, v in rows.items()}, tcfg, out,
                  progress=False)
            lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            results[backend].append(statistics.median(m["step_time_s"] for m in lines[args.warmup:]))
    return {k: statistics.median(v) for k, v in results.items()}


if __name__ == "__main__":
    sys.exit(main())

"""The training engine's DeepSpeed back end against its plain torch back end: step time on the same model,
batches and optimizer settings, in one process.

Runs alternate (torch, deepspeed stage s, ... repeated), each a full `train()` call; a run's figure is the
median step time after its warm-up steps, and the table shows the median over repeats. On a CPU machine
DeepSpeed runs with DS_ACCELERATOR=cpu, gloo and torch's AdamW, as the engine sets it up.

    .venv/bin/python benchmarks/bench_engine.py [--steps 20 --warmup 5 --repeats 3 --stages 0,2 --threads 1]

The last line is `ratio deepspeed/torch step_time: X` for the first stage listed (target <= 1.15).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class TinyTransformerLM(nn.Module):
    """A small causal transformer, big enough that a step is real work on a CPU."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim))
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True))


def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(batch["x"])
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["x"][:, 1:].flatten()), {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stages", default="0,2", help="ZeRO stages to measure, comma-separated")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    # one thread by default: the figure is the engines' overhead, and a second thread on a busy 2-core machine
    # mostly adds spin-waiting noise
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps <= args.warmup:
        sys.exit("--steps must exceed --warmup")

    from kat_core.config import TrainConfig
    from kat_core.train import train

    stages = [int(s) for s in args.stages.split(",")]

    def batches(i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        return {"x": x, "num_tokens": x.numel()}

    def one_run(backend: str, stage: int) -> float:
        torch.manual_seed(0)
        model = TinyTransformerLM(args.vocab, args.dim, args.layers, 4, args.seq)
        cfg = TrainConfig(backend=backend, zero_stage=stage, steps=args.steps, warmup_steps=2,
                          micro_batch_size=args.batch, checkpoint_every=0, keep_checkpoints=1, log_every=10**6)
        with tempfile.TemporaryDirectory() as tmp:
            result = train(model, loss_fn, batches, cfg, Path(tmp), progress=False)
            rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
        times = [row["step_time_s"] for row in rows[args.warmup:]]
        return statistics.median(times)

    names = ["torch"] + [f"deepspeed zero-{s}" for s in stages]
    runs: dict[str, list[float]] = {n: [] for n in names}
    one_run("torch", 0)  # warm-up: first-call costs (DeepSpeed import and process group, allocator)
    one_run("deepspeed", stages[0])
    for _ in range(args.repeats):
        runs["torch"].append(one_run("torch", 0))
        for s in stages:
            runs[f"deepspeed zero-{s}"].append(one_run("deepspeed", s))

    model = TinyTransformerLM(args.vocab, args.dim, args.layers, 4, args.seq)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\nmodel {n_params / 1e6:.2f}M params, micro-batch {args.batch} x {args.seq} tokens, {args.steps} "
          f"steps ({args.warmup} warm-up) x {args.repeats} repeats, {torch.get_num_threads()} threads")
    torch_ms = statistics.median(runs["torch"]) * 1e3
    print(f"{'engine':<20} {'step ms (median)':>17} {'min':>8} {'max':>8} {'vs torch':>9}")
    for name in names:
        ms = [t * 1e3 for t in runs[name]]
        med = statistics.median(ms)
        print(f"{name:<20} {med:>17.2f} {min(ms):>8.2f} {max(ms):>8.2f} {med / torch_ms:>9.3f}")
    ratio = statistics.median(runs[f"deepspeed zero-{stages[0]}"]) / statistics.median(runs["torch"])
    print(f"ratio deepspeed/torch step_time: {ratio:.3f}")


if __name__ == "__main__":
    main()

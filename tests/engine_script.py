"""A tiny model and data for the engine tests, and a script that trains it (run directly, under `torchrun`
or under the `deepspeed` launcher).

The task: map each random token to its image under a fixed permutation. A small embedding + MLP learns it in
a few dozen steps; dropout makes the run depend on the RNG state, so resume has to restore it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 32
SEQ = 16


class TinyLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 32, dropout: float = 0.1):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mlp = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.mlp(self.emb(tokens)))))


def make_model(seed: int = 0, dropout: float = 0.1) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(dropout=dropout)


def loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(batch["x"])
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["y"].flatten())
    acc = (logits.argmax(-1) == batch["y"]).float().mean()
    return ce, {"acc": float(acc)}


def make_batches(batch_size: int, seed: int = 0, sleep: float = 0.0):
    """Micro-batch i, deterministically: random tokens seeded by (seed, i), targets through the permutation.
    `sleep` slows each micro-batch so a test can kill the process mid-run."""
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))

    def get(i: int) -> dict[str, Any]:
        if sleep:
            time.sleep(sleep)
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        x = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)
        return {"x": x, "y": perm[x], "num_tokens": x.numel()}

    return get


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    from kat_core.config import TrainConfig
    from kat_core.train import train
    from kat_core.util import short_lived_gc

    short_lived_gc()  # as a stage's process: no final garbage collection over torch and deepspeed

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = ap.parse_args()

    torch.set_num_threads(1)  # two processes on two cores
    cfg = TrainConfig(backend=args.backend, zero_stage=args.zero_stage, steps=args.steps, lr=args.lr,
                      warmup_steps=3, micro_batch_size=args.micro_batch, grad_accum=args.grad_accum,
                      checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep, log_every=5,
                      bf16=False)  # fp32: the tests compare curves across launchers to 1e-4
    batches = make_batches(args.micro_batch, args.seed, args.sleep)
    model = make_model(args.seed, args.dropout)
    result = train(model, loss_fn, batches, cfg, args.out, progress=False, seed=args.seed)
    rank = int(os.environ.get("RANK", 0))
    report = {"rank": rank, "world_size": result.world_size, "step": result.step,
              "resumed_from": result.resumed_from, "digest": weights_digest(result.model),
              "loss": result.metrics.get("loss")}
    (args.out / f"result-rank{rank}.json").write_text(json.dumps(report) + "\n")
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()

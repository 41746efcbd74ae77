"""A tiny AutoThink checkpoint for the evaluation and server tests: a Llama of hidden size 32 and 2 layers,
trained a few seconds on rendered arith responses in both modes, so that it writes grammar-shaped text with
stops and varied lengths (its arithmetic is mostly wrong, which these tests do not need).

Built once per test session into pytest's base temp dir and shared by the modules that ask for it."""

from __future__ import annotations

from pathlib import Path

TINY_STEPS = 300


def train_tiny(tokenizer, cfg, task, *, steps: int = TINY_STEPS):
    """A fresh Llama of `cfg` trained `steps` Adam steps on both regimes of 120 of `task`'s train items;
    returned in eval mode."""
    import torch

    from kat_core.data.judge import judge_text
    from kat_core.format import prompt_text, render
    from kat_core.model.lm import build_model

    rows = []
    for it in task.examples("train", n=120):
        for mode in ("off", "on"):
            think = "\n".join(it.steps) if mode == "on" else None
            text = render(judge_text(task.intent_features(it), mode), mode, task.answer_text(it), think=think)
            ids = tokenizer(prompt_text(it.prompt) + text, add_special_tokens=False)["input_ids"]
            rows.append(ids + [tokenizer.eos_token_id])
    rows.sort(key=len)  # batches of neighbours: little padding
    model = build_model(cfg, tokenizer, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(steps):
            lo = int(torch.randint(0, len(rows) - 16, (1,), generator=g))
            batch = rows[lo : lo + 16]
            x = torch.full((16, max(map(len, batch))), tokenizer.pad_token_id)
            y = torch.full_like(x, -100)
            for r, ids in enumerate(batch):
                x[r, : len(ids)] = y[r, : len(ids)] = torch.tensor(ids)
            loss = model(input_ids=x, labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def tiny_checkpoint(base: Path, tokenizer) -> Path:
    out = Path(base) / "tiny-autothink"
    if (out / "config.json").is_file():
        return out
    from kat_core.config import ModelConfig
    from kat_core.model.checkpoint import save_checkpoint
    from kat_core.tasks.arith import ArithTask

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=256, mtp_depth=0)
    # levels 1, 3 and 4: three-step traces, the tiny model learns their shape quickly
    return save_checkpoint(out, train_tiny(tokenizer, cfg, ArithTask(levels=[1, 3, 4])), tokenizer)

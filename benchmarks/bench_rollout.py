"""Our rollout engine (`kat_core.rollout.generate`) against HF `model.generate`: sampling throughput on the
same model, prompts, forced prefixes and budget, in one process.

The workload is what cold start and Step-SRPO sample: arithmetic prompts of every difficulty level, half of
them forced think-off (a short answer) and half forced think-on (a digit-level trace), so lengths within a
batch vary a lot. Both engines sample at temperature 1 with top-p 1 (HF's default top-k 50 is switched off)
and stop a row at `</answer>` or EOS (HF gets both as `eos_token_id`) or after `--max-new` tokens. Tokens are
counted the same way for both: each row's generated tokens up to and including its stop token.

Without `--model` the model is demo-profile sized (`load_config("demo").model`) and trained here for a
few hundred steps on rendered grammar examples so that it writes real responses with realistic lengths
(the train takes about a minute); `--model DIR` loads a KAT checkpoint instead.

    .venv/bin/python benchmarks/bench_rollout.py [--model DIR] [--repeats 5] [--threads 1]

After a warm-up of each, repeats alternate (ours, HF, ours, HF, ...); the table shows medians. The last line
is `ratio ours/hf_generate tokens_per_s: X` (target >= 2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_trained_model(steps: int, batch: int = 16, lr: float = 5e-3, seed: int = 0):
    """A demo-sized model and tokenizer, trained briefly on rendered responses in both modes."""
    from kat_core.config import load_config
    from kat_core.data.judge import judge_text
    from kat_core.format import prompt_text, render
    from kat_core.model.lm import build_model
    from kat_core.tasks.arith import ArithTask
    from kat_core.tokenizer import train_tokenizer

    cfg = load_config("demo").model
    task = ArithTask()
    items = task.examples("train", n=1000, seed=seed)
    texts = []
    for it in items:
        feats = task.intent_features(it)
        for mode in ("off", "on"):  # both regimes for every item, so either can be forced
            think = "\n".join(it.steps) if mode == "on" else None
            response = render(judge_text(feats, mode), mode, task.answer_text(it), think=think)
            texts.append(prompt_text(it.prompt) + response)
    tok = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    model = build_model(cfg, tok, seed=seed)
    # sorted by length, a batch is a random run of neighbours: little padding, so the short train goes far
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    rows.sort(key=len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        lo = int(torch.randint(0, len(rows) - batch + 1, (1,), generator=g))
        pick = rows[lo : lo + batch]
        width = max(map(len, pick))
        x = torch.full((batch, width), tok.pad_token_id)
        y = torch.full((batch, width), -100)
        for r, ids in enumerate(pick):
            x[r, : len(ids)] = y[r, : len(ids)] = torch.tensor(ids)
        for group in opt.param_groups:  # short warm-up, then linear decay: a short run still ends on a low loss
            group["lr"] = lr * min(1.0, (step + 1) / 10) * (1 - step / steps)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return model, tok, loss.item()


def workload(tokenizer, batch: int, seed: int) -> tuple[list[str], list[str]]:
    """`batch` test prompts over all levels, alternately forced think-off and think-on."""
    from kat_core.data.judge import judge_text
    from kat_core.format import forced_prefix
    from kat_core.tasks.arith import ArithTask

    task = ArithTask()
    items = task.examples("test", n=batch, seed=seed)
    modes = ["off" if i % 2 == 0 else "on" for i in range(len(items))]
    forced = [forced_prefix(judge_text(task.intent_features(it), m), m) for it, m in zip(items, modes, strict=True)]
    return [it.prompt for it in items], forced


def run_ours(model, tokenizer, prompts, forced, max_new: int, seed: int) -> tuple[int, float]:
    from kat_core.rollout import generate

    t0 = time.perf_counter()
    samples = generate(model, tokenizer, prompts, forced=forced, max_new_tokens=max_new, temperature=1.0,
                       top_p=1.0, seed=seed, batch_size=len(prompts))
    return sum(s.num_generated for s in samples), time.perf_counter() - t0


def run_hf(model, tokenizer, prompts, forced, max_new: int, seed: int) -> tuple[int, float]:
    from kat_core.format import ANSWER_CLOSE, prompt_text

    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(ANSWER_CLOSE)]
    t0 = time.perf_counter()  # tokenising and padding count for HF as they do for ours
    contexts = [tokenizer(prompt_text(p), add_special_tokens=False)["input_ids"]
                + tokenizer(f, add_special_tokens=False)["input_ids"] for p, f in zip(prompts, forced, strict=True)]
    width = max(map(len, contexts))
    ids = torch.full((len(contexts), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(contexts):  # left padding, as decoder-only generation needs
        ids[i, width - len(c):] = torch.tensor(c)
        mask[i, width - len(c):] = 1
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, max_new_tokens=max_new, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    elapsed = time.perf_counter() - t0
    tokens = 0
    for row in out[:, width:].tolist():  # real tokens: up to and including the first stop token
        ends = [i for i, t in enumerate(row) if t in stops]
        tokens += ends[0] + 1 if ends else len(row)
    return tokens, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a KAT checkpoint dir (default: train a demo-sized model here)")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.model:
        from kat_core.model.checkpoint import load_checkpoint

        model, tokenizer, _ = load_checkpoint(args.model)
        model.eval()
        source = args.model
    else:
        t0 = time.perf_counter()
        model, tokenizer, loss = build_trained_model(args.train_steps)
        source = f"demo-sized, trained {args.train_steps} steps here ({time.perf_counter() - t0:.0f}s, loss {loss:.3f})"
    params = sum(p.numel() for p in model.parameters())
    prompts, forced = workload(tokenizer, args.batch, seed=0)
    print(f"model: {source}; {params / 1e6:.2f}M params; torch threads: {args.threads}")
    print(f"workload: {len(prompts)} arith prompts (levels 1-5), half forced think-off, half think-on; "
          f"batch {args.batch}, max {args.max_new} new tokens, temperature 1, top_p 1")

    engines = {"ours": run_ours, "hf_generate": run_hf}
    for fn in engines.values():  # warm-up
        fn(model, tokenizer, prompts, forced, args.max_new, seed=10_000)
    results: dict[str, list[tuple[int, float]]] = {name: [] for name in engines}
    for r in range(args.repeats):
        for name, fn in engines.items():
            results[name].append(fn(model, tokenizer, prompts, forced, args.max_new, seed=r))

    print(f"\n{'engine':<12} {'tokens':>8} {'seconds':>8} {'tokens/s':>10} {'mean len':>9}  "
          f"(medians of {args.repeats})")
    tps = {}
    for name, runs in results.items():
        tps[name] = statistics.median(t / s for t, s in runs)
        tokens = statistics.median(t for t, _ in runs)
        secs = statistics.median(s for _, s in runs)
        print(f"{name:<12} {tokens:>8.0f} {secs:>8.2f} {tps[name]:>10.0f} {tokens / len(prompts):>9.1f}")
    print(f"ratio ours/hf_generate tokens_per_s: {tps['ours'] / tps['hf_generate']:.2f}")


if __name__ == "__main__":
    main()

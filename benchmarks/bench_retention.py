"""How far fine-tuned models moved from their base on requests none of them trained on.

For the 20 retention questions (kat_core/tasks/retention.py, held out from self-replay), the base answers
greedily through its chat template; each model then reads those same answers where it would write them
(after the think-off grammar's prefix, `<judge>chat: direct</judge><think_off><answer>`), and the table gives
KL(base || model) per answer token (the base's own view, its chat template alone, as the reference; the
grammar's tags left out of both distributions) beside the share of the base's right answers each model's own
greedy answer keeps (`kept`, as `kat eval compare` counts it). Kept answers move in steps of one in thirteen;
the KL says how far the model's whole distribution moved.

    .venv/bin/python benchmarks/bench_retention.py BASE MODEL [MODEL ...]

The last line is `ratio kl last/first model: X`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRAMMAR_PREFIX = "<judge>chat: direct</judge><think_off><answer>"


def log_probs(model, tokenizer, request: str, answer: list[int], tags: list[int]):
    import torch

    context = tokenizer(request, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([context + answer])).logits[0, len(context) - 1:-1].float()
    logits[:, tags] = -1e4  # not the base's tokens: out of both distributions
    return torch.log_softmax(logits, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()

    from kat_core.chat import request_text
    from kat_core.eval.evaluate import score
    from kat_core.format import SPECIAL_TOKENS
    from kat_core.model.lm import load_model
    from kat_core.rollout import generate
    from kat_core.tasks.retention import RetentionTask
    from kat_core.util import cpu_threads

    cpu_threads()
    task = RetentionTask()
    items = task.examples()
    base, tokenizer = load_model(args.base)
    tags = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    said = generate(base, tokenizer, [i.prompt for i in items], temperature=0.0, max_new_tokens=args.max_new_tokens,
                    stop_at_answer=False)
    answers = [tokenizer(s.text.strip(), add_special_tokens=False)["input_ids"] for s in said]
    cache: dict = {}
    base_right = [score(task, item, s, cache, plain=True).correct for item, s in zip(items, said, strict=True)]
    reference = [log_probs(base, tokenizer, request_text(tokenizer, i.prompt), a, tags)
                 for i, a in zip(items, answers, strict=True)]
    del base

    print(f"\n{len(items)} retention questions; the base gets {sum(base_right)} right (plain, greedy)")
    print(f"{'model':<60} {'kl_per_token':>12} {'kept':>7}")
    kls = []
    for path in args.models:
        model, _ = load_model(path)
        kl, tokens = 0.0, 0
        for item, answer, lp in zip(items, answers, reference, strict=True):
            lq = log_probs(model, tokenizer, request_text(tokenizer, item.prompt) + GRAMMAR_PREFIX, answer, tags)
            kl += (lp.exp() * (lp - lq)).sum().item()
            tokens += len(answer)
        own = generate(model, tokenizer, [i.prompt for i in items], temperature=0.0,
                       max_new_tokens=args.max_new_tokens)
        kept = sum(score(task, item, s, cache, plain=True).correct and right
                   for item, s, right in zip(items, own, base_right, strict=True))
        kls.append(kl / tokens)
        print(f"{str(path)[-60:]:<60} {kl / tokens:>12.3f} {kept:>3}/{sum(base_right):<3}")
    print(f"ratio kl last/first model: {kls[-1] / kls[0]:.2f}")


if __name__ == "__main__":
    main()

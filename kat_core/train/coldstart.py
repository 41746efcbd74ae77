"""The `coldstart` stage: majority-vote mode labels from the model's own samples, then SFT.

For each training prompt, k samples forced think-off and k forced think-on (the judge pre-filled from the
prompt's intent features). Label think-off when think-off is majority-correct and its accuracy is within
δ of think-on's; otherwise think-on. The SFT example for a prompt is its best verified response in the
labelled mode (correct, fewest tokens), under a judge written from intent features for that mode, so the
model learns both the choice and why. A prompt with no verified sample in its labelled mode falls back to
the task's reference response in that mode (verified by construction), counted as `from_reference`, so an
undertrained model still gets a complete SFT set.

Output: a checkpoint (as `pretrain` writes it) with `labels.jsonl` (per prompt: accuracy in each mode,
label, reason) and `coldstart.json` (label distribution and accuracy per difficulty level).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from kat_core.config import ColdStartConfig, KatConfig
from kat_core.data.judge import judge_text
from kat_core.errors import KatError
from kat_core.format import forced_prefix, parse, render
from kat_core.tasks.base import Item, Task

log = logging.getLogger(__name__)

LABELS, SUMMARY = "labels.jsonl", "coldstart.json"


def majority_vote(acc_off: float, acc_on: float, delta: float) -> tuple[str, str]:
    """(label, reason) per DESIGN: think-off when majority-correct and within delta of think-on."""
    if acc_off > 0.5 and acc_off >= acc_on - delta:
        return "off", f"think-off majority-correct ({acc_off:.2f}) and within {delta} of think-on ({acc_on:.2f})"
    if acc_off <= 0.5:
        return "on", f"think-off not majority-correct ({acc_off:.2f}; think-on {acc_on:.2f})"
    return "on", f"think-on clearly better ({acc_on:.2f} vs think-off {acc_off:.2f})"


def sample_both_modes(model, tokenizer, pairs: list[tuple[Task, Item]], cfg: ColdStartConfig, seed: int,
                      progress: bool = False) -> list[dict[str, Any]]:
    """k forced samples per mode per item, verified -> per item: accuracies, tokens and best responses."""
    from kat_core.rollout import generate

    prompts, forced = [], []
    for task, item in pairs:
        features = task.intent_features(item)
        for mode in ("off", "on"):
            prompts.append(item.prompt)
            forced.append(forced_prefix(judge_text(features, mode), mode))
    samples = generate(model, tokenizer, prompts, forced=forced, n=cfg.k, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, seed=seed, batch_size=cfg.batch_size,
                       progress=progress)
    results = []
    for i, (task, item) in enumerate(pairs):
        row: dict[str, Any] = {"id": item.id, "difficulty": item.difficulty}
        for j, mode in enumerate(("off", "on")):
            group = [s for s in samples if s.prompt_index == 2 * i + j]
            verified = []
            for s in group:
                parsed = parse(s.text)
                if parsed.well_formed and parsed.mode == mode and task.verify(item, parsed.answer or ""):
                    verified.append((s.segment_counts["total"], parsed))
            row[f"acc_{mode}"] = len(verified) / len(group)
            row[f"tokens_{mode}"] = sum(s.segment_counts["total"] for s in group) / len(group)
            best = min(verified, key=lambda v: v[0])[1] if verified else None
            row[f"best_{mode}"] = None if best is None else {"think": best.think, "answer": best.answer}
        results.append(row)
    return results


def label_items(pairs: list[tuple[Task, Item]], sampled: list[dict[str, Any]], delta: float):
    """-> (labels rows, SFT records in the dataset schema)."""
    labels, sft = [], []
    for (task, item), row in zip(pairs, sampled, strict=True):
        label, reason = majority_vote(row["acc_off"], row["acc_on"], delta)
        best = row[f"best_{label}"]
        source = "sample"
        if best is None and item.steps:
            best, source = {"think": "\n".join(item.steps), "answer": task.answer_text(item)}, "reference"
        labels.append({
            "id": item.id, "prompt": item.prompt, "difficulty": item.difficulty,
            "acc_off": row["acc_off"], "acc_on": row["acc_on"],
            "tokens_off": round(row["tokens_off"], 1), "tokens_on": round(row["tokens_on"], 1),
            "label": label, "reason": reason, "in_sft": best is not None, "sft_source": source if best else None,
        })
        if best is None:
            continue
        judge = judge_text(task.intent_features(item), label)
        completion = render(judge, label, best["answer"], think=best["think"] if label == "on" else None)
        sft.append({
            "id": f"{item.id}:{label}", "source_id": item.id, "family": item.family, "prompt": item.prompt,
            "answer": item.answer, "difficulty": item.difficulty, "mode": label, "regime": "tagged",
            "complexity": 1.0 - row["acc_off"], "completion": completion,
        })
    return labels, sft


def summarize(labels: list[dict[str, Any]]) -> dict[str, Any]:
    """Label distribution and mean accuracy per mode, per difficulty level."""
    by_level: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in labels:
        by_level[row["difficulty"]].append(row)
    per_level = {
        str(lvl): {
            "prompts": len(rows),
            "label_off": sum(r["label"] == "off" for r in rows),
            "label_on": sum(r["label"] == "on" for r in rows),
            "acc_off": round(sum(r["acc_off"] for r in rows) / len(rows), 4),
            "acc_on": round(sum(r["acc_on"] for r in rows) / len(rows), 4),
        }
        for lvl, rows in sorted(by_level.items())
    }
    return {
        "prompts": len(labels),
        "label_off_share": round(sum(r["label"] == "off" for r in labels) / max(len(labels), 1), 4),
        "in_sft": sum(r["in_sft"] for r in labels),
        "from_reference": sum(r.get("sft_source") == "reference" for r in labels),
        "per_level": per_level,
    }


def stratified(pairs: list[tuple[Task, Item]], n: int, seed: int) -> list[tuple[Task, Item]]:
    """n items taken round-robin over difficulty levels (seeded), so rare easy levels are labelled too."""
    import random

    by_level: dict[int, list[tuple[Task, Item]]] = defaultdict(list)
    for pair in pairs:
        by_level[pair[1].difficulty].append(pair)
    rng = random.Random(seed)
    for group in by_level.values():
        rng.shuffle(group)
    out: list[tuple[Task, Item]] = []
    while len(out) < n and any(by_level.values()):
        for level in sorted(by_level):
            if by_level[level] and len(out) < n:
                out.append(by_level[level].pop())
    return out


def coldstart(config: KatConfig, checkpoint: str | Path, out_dir: str | Path, *, progress: bool = True
              ) -> dict[str, Any]:
    """Label prompts by majority vote, fine-tune `checkpoint` on the labelled responses into `out_dir`."""
    from kat_core.data.dataset import write_jsonl
    from kat_core.data.synth import training_items
    from kat_core.model.checkpoint import check_checkpoint, load_checkpoint
    from kat_core.train.pretrain import pretrain

    cfg = config.coldstart
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_checkpoint(checkpoint)
    pairs = stratified(training_items(config), cfg.prompts, config.seed)
    model, tokenizer, _ = load_checkpoint(checkpoint)
    model.eval()
    log.info("cold start: sampling %d prompts x %d per mode from %s", len(pairs), cfg.k, checkpoint)
    sampled = sample_both_modes(model, tokenizer, pairs, cfg, config.seed, progress=progress)
    labels, sft = label_items(pairs, sampled, cfg.delta)
    summary = summarize(labels)
    if not sft:
        raise KatError(f"cold start: no prompt had a verified response in its labelled mode ({checkpoint} may "
                       "be undertrained); nothing to fine-tune on")
    log.info("cold start labels: %s", {lvl: (v["label_off"], v["label_on"]) for lvl, v in summary["per_level"].items()})

    work = Path(tempfile.mkdtemp(prefix=".coldstart-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        (work / "sft").mkdir()
        write_jsonl(work / "sft" / "train-00000.jsonl", sft)
        write_jsonl(work / LABELS, labels)
        (work / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        metrics = pretrain(
            config, work / "sft", out_dir,
            model_cfg=config.model.model_copy(update={"base": str(checkpoint)}),
            train_cfg=cfg.train, progress=progress, stage="coldstart",
            extra_files={LABELS: work / LABELS, SUMMARY: work / SUMMARY},
            extra_meta={"coldstart": summary},
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"metrics": metrics, **summary}

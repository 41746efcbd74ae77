"""The `coldstart` stage: mode labels from the model's own forced answers, by the one decision criterion, then SFT.

Prompts come from the dataset's held-out pool (`pool.jsonl`, use "coldstart"): pretraining never saw them, so
a direct answer is measured as on a new request, not a memorised one. For each prompt both forced modes are
measured under the evaluation's decoding (`autothink.decoding`: one greedy answer per mode, or `coldstart.k`
samples at a temperature), the judge pre-filled from the prompt's intent features. Each prompt's preference
`V_off - V_on + delta` (kat_core.autothink) is averaged over its *feature cell* (level and judge description,
what the model can see before answering), and the cell's verdict labels every prompt of the cell: the model
is taught the best mode a selector can reach, not the coin flips of single items. A cell thinks where
thinking's edge exceeds `autothink.tie_z` standard errors of the mean; within the noise it is a tie, which
thinks when think-on is measurably more accurate (`autothink.accuracy_first`) and goes to think-off otherwise.
A cell with fewer than `autothink.min_cell` prompts takes its level's verdict.

Labels measured on the student need not hold for the model the SFT makes of it: on pipeline seed 1 the SFT made
the direct answers of a level-4 cell right 0.99 of the time where the student's were 0.966, whose accuracy gap had
labelled the cell think. With `coldstart.rounds` > 1 each later round measures the same prompts on the previous
round's model and relabels them; when a label changed, the student is fine-tuned again on the new labels (with the
newer model's verified responses), else the previous round's model is the cold start (`coldstart.json`'s
`rounds` says what each round changed). The demo labels once (README, "Labels for the model that decides").

The SFT example for a prompt is its shortest verified response in the labelled mode, under the judge written
from intent features for that mode, so the model learns both the choice and why. With `coldstart.judge_samples`,
the judges the model writes itself are sampled too, and each that misreads a thinking prompt adds a copy of its
example under that judge, the judge masked from the loss (`misread_copies`: its trace learns to follow the
request, not the description). A prompt with no verified
response in its labelled mode falls back to the task's reference response (counted as `from_reference`);
when no response at all was well formed (the model does not speak the grammar yet) the stage says so loudly
and records `well_formed_answers: 0` in its summary; with `coldstart.min_well_formed` set, fewer well-formed
answers than that share fail the stage instead.

Output: a checkpoint (as `pretrain` writes it) with `labels.jsonl` (the last round's: per prompt, accuracy and
tokens in each mode, preference, cell, label, reason) and `coldstart.json` (label distribution and accuracy per level).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from kat_core.autothink import cell_of, cell_tally, preference_off
from kat_core.config import AutoThinkConfig, ColdStartConfig, KatConfig, TrainConfig
from kat_core.data.dataset import stratified
from kat_core.data.judge import describe, judge_text
from kat_core.errors import KatError
from kat_core.format import forced_prefix, parse, render
from kat_core.model.checkpoint import LABELS
from kat_core.tasks.base import Item, Task

log = logging.getLogger(__name__)

SUMMARY = "coldstart.json"


def sample_both_modes(model, tokenizer, pairs: list[tuple[Task, Item]], cfg: ColdStartConfig,
                      criterion: AutoThinkConfig, seed: int, progress: bool = False) -> list[dict[str, Any]]:
    """Each item answered in both forced modes under the criterion's decoding (greedy: one answer per mode;
    a temperature: `cfg.k` samples) -> per item: accuracy, mean tokens, best verified response, well-formed
    count per mode."""
    from kat_core.rollout import generate

    prompts, forced = [], []
    for task, item in pairs:
        features = task.intent_features(item)
        for mode in ("off", "on"):
            prompts.append(item.prompt)
            forced.append(forced_prefix(judge_text(features, mode), mode))
    greedy = criterion.temperature == 0
    samples = generate(model, tokenizer, prompts, forced=forced, n=1 if greedy else cfg.k,
                       max_new_tokens=cfg.max_new_tokens, temperature=criterion.temperature, top_p=cfg.top_p,
                       seed=seed, batch_size=cfg.batch_size, progress=progress)
    by_prompt: dict[int, list[Any]] = defaultdict(list)
    for s in samples:
        by_prompt[s.prompt_index].append(s)
    results = []
    for i, (task, item) in enumerate(pairs):
        row: dict[str, Any] = {"id": item.id, "difficulty": item.difficulty, "well_formed": 0}
        for j, mode in enumerate(("off", "on")):
            group = by_prompt[2 * i + j]
            verified = []
            for s in group:
                parsed = parse(s.text)
                row["well_formed"] += parsed.well_formed
                if parsed.well_formed and parsed.mode == mode and task.verify(item, parsed.answer or ""):
                    verified.append((s.segment_counts["total"], parsed))
            row[f"acc_{mode}"] = len(verified) / len(group)
            row[f"tokens_{mode}"] = sum(s.segment_counts["total"] for s in group) / len(group)
            best = min(verified, key=lambda v: v[0])[1] if verified else None
            row[f"best_{mode}"] = None if best is None else {"think": best.think, "answer": best.answer}
        results.append(row)
    return results


def label_items(pairs: list[tuple[Task, Item]], sampled: list[dict[str, Any]], criterion: AutoThinkConfig,
                misread: dict[str, list[str]] | None = None):
    """-> (labels rows, SFT records in the dataset schema): every prompt labelled with its cell's mode, plus
    the thinking examples' copies under the model's own misreadings of them (`misread_copies`)."""
    prefs, cells = [], []
    for (task, item), row in zip(pairs, sampled, strict=True):
        prefs.append(preference_off((row["acc_off"], row["tokens_off"]), (row["acc_on"], row["tokens_on"]),
                                    criterion))
        cells.append(cell_of(task.intent_features(item)))
    gaps = [row["acc_on"] - row["acc_off"] for row in sampled]
    tally = cell_tally(zip(cells, (item.difficulty for _, item in pairs), prefs, gaps, strict=True), criterion)
    cell_info = tally.summary()
    labels, sft, responses, direct_traces = [], [], [], []
    for (task, item), row, pref, cell in zip(pairs, sampled, prefs, cells, strict=True):
        info = cell_info[cell]
        label = info["mode"]
        reason = (f"cell {cell!r} ({info['n']} prompts): mean V_off - V_on + delta = {info['mean']:+.3f} "
                  f"+- {info['error']:.3f}" + ("" if info["by"] == "cell" else ", too few: the level's verdict"))
        best = row[f"best_{label}"]
        source = "sample"
        if best is None and item.steps:
            best, source = {"think": "\n".join(item.steps), "answer": task.answer_text(item)}, "reference"
        labels.append({
            "id": item.id, "prompt": item.prompt, "difficulty": item.difficulty, "cell": cell,
            "acc_off": row["acc_off"], "acc_on": row["acc_on"],
            "tokens_off": round(row["tokens_off"], 1), "tokens_on": round(row["tokens_on"], 1),
            "preference_off": round(pref, 4), "label": label, "reason": reason,
            "in_sft": best is not None, "sft_source": source if best else None,
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
        responses.append((judge, best))
        if label == "off" and row["best_on"] is not None:
            direct_traces.append((sft[-1], describe(task.intent_features(item)), row["best_on"]))
    return labels, sft + misread_copies(sft, responses, misread or {}, direct_traces)


def own_judges(model, tokenizer, pairs: list[tuple[Task, Item]], k: int, seed: int) -> dict[str, list[str]]:
    """The judges the model writes itself (auto mode, `k` per prompt at temperature 1) that misdescribe their
    request -> per item id, those descriptions (each once): the misreadings its traces will be written under."""
    from kat_core.rollout import generate

    samples = generate(model, tokenizer, [item.prompt for _, item in pairs], n=k, max_new_tokens=32,
                       temperature=1.0, seed=seed, batch_size=64)
    found: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        task, item = pairs[s.prompt_index]
        judge = parse(s.text).judge
        description = judge.rpartition(":")[0].strip() if judge else ""
        canonical = describe(task.intent_features(item))
        readable = description and "<" not in description and "\n" not in description and len(description) < 120
        if readable and description != canonical and description not in found[item.id]:
            found[item.id].append(description)
    return dict(found)


def misread_copies(sft: list[dict[str, Any]], responses: list[tuple[str, dict[str, Any]]],
                       misread: dict[str, list[str]], direct_traces: list[tuple[dict, str, dict]] = ()
                       ) -> list[dict[str, Any]]:
    """Copies of the thinking SFT examples under each misreading of their request the model wrote itself
    (`own_judges`), marked `judge_context` (the judge and decision weigh 0 in the loss, kat_core.train.data): the
    same verified trace and answer, now to be written under the judge the model will actually have written.
    Why: the judge describes the request before the response, and a trace trained only under correct judges
    learns to follow the description instead of the request. Measured on pipeline seed 4's cold start (500
    held-out items): auto's own judge misread a level-5 request's steps or carries on 3 items that forced
    thinking answered right, and each trace obeyed it ("product plus sum, 6 steps, carries" for 70*3+60: an
    invented carry, 970; "6 steps" without carries for 72*2+26: the last column dropped, 70), so auto lost 0.006
    of accuracy against its own choices' forced outcomes. The masked judge teaches no description or verdict.
    Why the model's own misreadings and not other prompts' judges: copies under judges of other cells of the level
    (tried first) also fixed the traces, but blurred the decisions between neighbouring cells (pipeline seed 2's
    "L4 sum, 3 steps, carries" went from think-off at log-odds -2.3 to thinking, with 123 copies).
    Direct answers get no copies: with no trace, the description is the only working they have. But a misreading
    that is another cell's correct description (a level-4 "difference, 3 steps, carries" read as level 3's
    "difference, 3 steps") would be seen in SFT only over traces of the other cell (borrowing ones), and the
    other cell's own forced traces would follow (pipeline seed 2: forced thinking at level 3 fell from 1.00 to
    0.93, inventing borrows): so the direct-labelled prompts whose thinking description was misread this way
    bring their own verified trace under it (`direct_traces`: (SFT record, description, trace)), masked alike."""
    copies = []
    used = {d for descriptions in misread.values() for d in descriptions}
    for record, description, best in direct_traces:
        if description in used:
            completion = render(f"{description}: think", "on", best["answer"], think=best["think"])
            copies.append({**record, "id": f"{record['source_id']}:on-trace", "mode": "on", "completion": completion,
                           "judge_context": True})
    for record, (_, best) in zip(sft, responses, strict=True):
        if record["mode"] != "on":
            continue
        for description in misread.get(record["source_id"], []):
            completion = render(f"{description}: think", "on", best["answer"], think=best["think"])
            copies.append({**record, "id": f"{record['id']}:misread-{len(copies)}", "completion": completion,
                           "judge_context": True})
    return copies


def sft_schedule(train: TrainConfig, sft: list[dict[str, Any]]) -> TrainConfig:
    """The SFT's schedule with the misread copies on top: its steps grow by their share, so each labelled example
    is seen as often as without them. (Measured on pipeline seed 2: the same 180 steps over 1000 examples and
    ~270 copies left its level-4 think-off cell (76 prompts) unlearnt, level 4 thinking on all items.)"""
    copies = sum(bool(r.get("judge_context")) for r in sft)
    if not copies:
        return train
    return train.model_copy(update={"steps": math.ceil(train.steps * len(sft) / (len(sft) - copies))})


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


def label_round(config: KatConfig, checkpoint: Path, pairs: list[tuple[Task, Item]], progress: bool):
    """Measure both forced modes of `pairs` on `checkpoint` and label them -> (labels, SFT records, summary).
    Refuses (KatError) a model whose answers are too rarely well formed (`coldstart.min_well_formed`)."""
    from kat_core.model.checkpoint import load_checkpoint

    cfg = config.coldstart
    model, tokenizer, _ = load_checkpoint(checkpoint)
    model.eval()
    log.info("cold start: %d prompts, both modes (%s) from %s", len(pairs), config.autothink.decoding, checkpoint)
    sampled = sample_both_modes(model, tokenizer, pairs, cfg, config.autothink, config.seed, progress=progress)
    misread = own_judges(model, tokenizer, pairs, cfg.judge_samples, config.seed) if cfg.judge_samples else None
    labels, sft = label_items(pairs, sampled, config.autothink, misread)
    summary = summarize(labels)
    summary["misread_copies"] = sum(bool(r.get("judge_context")) for r in sft)
    summary["well_formed_answers"] = sum(row["well_formed"] for row in sampled)
    answers = len(pairs) * 2 * (1 if config.autothink.temperature == 0 else cfg.k)
    if summary["well_formed_answers"] < cfg.min_well_formed * answers:
        raise KatError(f"cold start: only {summary['well_formed_answers']} of {answers} forced answers of "
                       f"{checkpoint} are well formed (coldstart.min_well_formed {cfg.min_well_formed}): the model "
                       "does not speak the response grammar yet; train it longer first (pretrain on the dataset)")
    if not summary["well_formed_answers"]:  # loud: the labels below say nothing about this model
        log.warning("cold start: NONE of %s's forced answers is well formed (it does not speak the response "
                    "grammar yet): the labels rest on answer lengths alone and every SFT example is a reference "
                    "trace; set coldstart.min_well_formed to fail here instead", checkpoint)
    elif summary["from_reference"] > len(labels) / 2:
        log.warning("cold start: %d of %d SFT examples are reference traces, not the model's own answers",
                    summary["from_reference"], len(labels))
    log.info("cold start labels: %s", {lvl: (v["label_off"], v["label_on"]) for lvl, v in summary["per_level"].items()})
    return labels, sft, summary


def relabelled(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """What a later labelling round changed: prompts and cells whose label differs (same prompts, same order)."""
    changed = [(b, a) for b, a in zip(before, after, strict=True) if b["label"] != a["label"]]
    cells: dict[str, str] = {}
    for b, a in changed:  # a cell's prompts share its label, so its first changed prompt speaks for it
        cells.setdefault(a["cell"], f"{b['label']} -> {a['label']}")
    return {"labels_changed": len(changed), "cells_changed": dict(sorted(cells.items()))}


def coldstart(config: KatConfig, checkpoint: str | Path, out_dir: str | Path, *, data_dir: str | Path,
              progress: bool = True) -> dict[str, Any]:
    """Label the dataset's cold-start prompts by the decision criterion, fine-tune `checkpoint` on the labelled
    responses into `out_dir`; with `coldstart.rounds` > 1, relabel on the fine-tuned model and fine-tune the
    student again on the new labels while labels change."""
    from kat_core.data.dataset import read_pool, swap_into_place, write_jsonl
    from kat_core.manifest import write_manifest
    from kat_core.model.checkpoint import KAT_META, check_checkpoint
    from kat_core.train.pretrain import pretrain
    from kat_core.util import cpu_threads

    cpu_threads()  # sampling and SFT under the one thread policy
    cfg = config.coldstart
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_checkpoint(checkpoint)
    pairs = stratified(read_pool(Path(data_dir), "coldstart", config.tasks.benchmarks_dir), cfg.prompts,
                       config.seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".coldstart-", dir=out_dir.parent))
    try:
        model_dir, labels, rounds, metrics = checkpoint, None, [], {}
        for r in range(1, cfg.rounds + 1):
            before = labels
            labels, sft, summary = label_round(config, model_dir, pairs, progress)
            if before is None:
                rounds.append({"round": 1, "measured_on": "the student", "trained": True})
            else:
                change = relabelled(before, labels)
                rounds.append({"round": r, "measured_on": f"round {r - 1}'s model", **change,
                               "trained": bool(change["labels_changed"])})
                log.info("cold start round %d: %d labels changed on the fine-tuned model%s", r,
                         change["labels_changed"], "".join(f"; {c}: {v}" for c, v in change["cells_changed"].items()))
                if not change["labels_changed"]:
                    break  # the labels hold for the model they made: it is the cold start
            (work / f"sft{r}").mkdir()
            write_jsonl(work / f"sft{r}" / "train-00000.jsonl", sft)
            # from the student every round: fine-tuning the previous round's model on instead overturned its
            # confident decision on the relabelled cell and leaked into the neighbouring cell (README)
            metrics = pretrain(config, work / f"sft{r}", work / f"round{r}",
                               model_cfg=config.model.model_copy(update={"base": str(checkpoint)}),
                               train_cfg=sft_schedule(cfg.train, sft), progress=progress, stage="coldstart")
            model_dir = work / f"round{r}"
        if cfg.align_steps:  # the decisions of the model the SFT made, checked on prompts it never trained on
            from kat_core.train.decisions import align_decisions

            model_dir, summary["decisions"] = align_decisions(config, model_dir, Path(data_dir), work / "aligned")
        # the checkpoint carries the last labelling (measured on the model it was trained from, or on itself when
        # no label changed) and every round's account, its manifest digesting the student it was made from
        summary = {**summary, "rounds": rounds}
        write_jsonl(model_dir / LABELS, labels)
        (model_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        meta = json.loads((model_dir / KAT_META).read_text())
        meta["extra"]["coldstart"] = summary
        (model_dir / KAT_META).write_text(json.dumps(meta, indent=2) + "\n")
        write_manifest(model_dir, stage="coldstart", config=config,
                       inputs={"data": Path(data_dir), "base": checkpoint})
        swap_into_place(model_dir, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"metrics": metrics, **summary}

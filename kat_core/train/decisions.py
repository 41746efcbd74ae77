"""Decisions for the model that decides (`coldstart.align_steps`): after the cold start's SFT, every feature
cell's verdict is measured again on the fine-tuned model, on prompts it never trained on; where most of a cell's
prompts are decided against that verdict, the decision tokens alone are fine-tuned towards each cell's verdict.

Why: the labels are measured on the student, but the SFT changes what the student's answers are worth. On
pipeline seed 1 the student answered "L4 difference, 3 steps, carries" directly right 0.966 of the time (a
measurable loss: the cell thinks), the fine-tuned model 0.989 (think-off), so every model of that pipeline
thought where its own cell oracle answers directly. Relabelling and fine-tuning the student again
(`coldstart.rounds: 2`) fixed the decision but moved the answers too. Here only the decision moves: the loss is
on the tokens where the two forced judges differ (the verdict word and the mode token, `srpo.decision_rows`),
and no answer is trained.

Prompts: the dataset's RL pool (`pool.jsonl`, use "rl"). The SFT trained each cold-start prompt's response in its
labelled mode, so measured on those prompts the labelled mode looks as the model memorised it; the RL prompts
are as new to the fine-tuned model as a request. Verdicts: the criterion's `CellTally` over both forced modes,
greedy (`srpo.census`, as the evaluation's cell oracle decides). The model's decision on a prompt: the sign of
`l_on - l_off` after the canonical description (no generation), as the RL stage's probe reads it.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from kat_core.autothink import CellTally, cell_of, tally_for
from kat_core.config import KatConfig
from kat_core.tasks.base import Item, Task

log = logging.getLogger(__name__)

PROMPTS_PER_STEP = 32  # half from the disagreeing cells, half from the others (they hold their decisions)
CHECK_EVERY = 5  # steps between checks of every cell's decision; alignment stops once they all agree
SETTLED = 0.9  # ... and a moved cell decides its verdict on this share of its prompts
# the KL at a holding prompt's decision tokens weighs this many times a response token's: with 1, items of
# three neighbouring level-4 cells of pipeline seed 1 began to answer directly (cell majorities unmoved)
HOLD_WEIGHT = 10.0
NEIGHBOURS = 0.75  # share of the holding half drawn from the moving cells' own levels, where decisions leak


def log_odds(model, tokenizer, pairs: list[tuple[Task, Item]], chunk: int = 128) -> list[float]:
    """The greedy decision's log-odds `l_on - l_off` per prompt, after its canonical description."""
    import contextlib

    from kat_core.train.srpo import probe_decisions

    odds: list[float] = []
    for lo in range(0, len(pairs), chunk):
        odds += probe_decisions(model, tokenizer, pairs[lo:lo + chunk], contextlib.nullcontext)
    return odds


def thinks_per_cell(model, tokenizer, pairs: list[tuple[Task, Item]]) -> dict[str, float]:
    """Per feature cell, the share of its prompts the model decides to think on (greedy: l_on > l_off)."""
    cells: dict[str, list[bool]] = defaultdict(list)
    for (task, item), o in zip(pairs, log_odds(model, tokenizer, pairs), strict=True):
        cells[cell_of(task.intent_features(item))].append(o > 0)
    return {c: sum(v) / len(v) for c, v in sorted(cells.items())}


def disagreements(tally: CellTally, thinks: dict[str, float]) -> dict[str, str]:
    """Cells whose prompts are mostly decided against the cell's verdict: {cell: "decided -> verdict"}."""
    out = {}
    for cell, share in thinks.items():
        verdict = "off" if tally.preference(cell) >= 0 else "on"
        decided = "on" if share > 0.5 else "off"
        if decided != verdict:
            out[cell] = f"{decided} -> {verdict}"
    return out


def anchored_rows(tokenizer, pairs: list[tuple[Task, Item]]) -> dict[str, Any]:
    """`srpo.decision_rows`, each arm continued with the task's reference response in that mode, and `kept_mask`
    over every position but the decision's that predicts a real token (the prompt, the description, the
    response)."""
    from kat_core.format import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN
    from kat_core.train.srpo import decision_rows

    def reference(task: Task, item: Item, mode: str) -> list[int]:
        think = f"{THINK_OPEN}{chr(10).join(item.steps)}{THINK_CLOSE}" if mode == "on" else ""
        text = f"{think}{ANSWER_OPEN}{task.answer_text(item)}{ANSWER_CLOSE}"
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = decision_rows(tokenizer, pairs, reference)
    rows["kept_mask"] = rows["attention_mask"][:, 1:].float() * (1 - rows["decision_mask"])
    return rows


def align_loss(model, reference, batch):
    """The moving prompts' two-arm decision loss, -log p(the verdict's arm) against the other arm, plus the exact
    KL to the model before alignment at every other position of every row, summed per row: the holding prompts'
    decisions, the descriptions and both modes' answers stay where they were (without it, 15 steps at 1e-4 moved
    pipeline seed 1's forced thinking from 0.988 to 0.974)."""
    import torch
    import torch.nn.functional as F

    from kat_core.train.srpo import _forward_logp, arm_log_odds, exact_kl

    logp_all = _forward_logp(model, batch)
    with torch.no_grad():
        ref_all = _forward_logp(reference, batch)
    odds = arm_log_odds(logp_all, batch)
    moving = batch["moving"]
    move = -F.logsigmoid(odds[moving] * batch["sign_on"][moving]).mean()
    # a holding prompt's decision tokens are kept too, and harder than the rest (HOLD_WEIGHT); a moving
    # prompt's are what moves
    holding = (~moving).repeat_interleave(2).float().unsqueeze(-1)
    kept = batch["kept_mask"] + HOLD_WEIGHT * batch["decision_mask"] * holding
    anchor = (exact_kl(logp_all, ref_all) * kept).sum(-1).mean()
    return move + anchor


def align_batches(tokenizer, pairs: list[tuple[Task, Item]], tally: CellTally, disagree: dict[str, str], seed: int):
    """Step i -> anchored rows of PROMPTS_PER_STEP prompts: half from the disagreeing cells (with their cell's
    verdict), half holding."""
    import torch

    cells = [cell_of(task.intent_features(item)) for task, item in pairs]
    by_cell: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(cells):
        by_cell[c].append(i)
    moving = [i for i, c in enumerate(cells) if c in disagree]
    # the holding half picks a cell first, then a prompt: a small cell beside the moving one is held as hard as a
    # large one (drawn by prompt, pipeline seed 1's 19-prompt "..., carries, 1-digit result" followed its
    # 84-prompt neighbour to think-off)
    holding = sorted(c for c in by_cell if c not in disagree)
    levels = {pairs[i][1].difficulty for i in moving}
    near = [c for c in holding if pairs[by_cell[c][0]][1].difficulty in levels] or holding

    def batch(i: int) -> dict[str, Any]:
        rng = random.Random(seed * 1_000_003 + i)
        half = PROMPTS_PER_STEP // 2
        chosen = [rng.choice(moving) for _ in range(half)]
        if holding:
            chosen += [rng.choice(by_cell[rng.choice(near if rng.random() < NEIGHBOURS else holding)])
                       for _ in range(half)]
        rows = anchored_rows(tokenizer, [pairs[j] for j in chosen])
        rows["sign_on"] = torch.tensor([1.0 if tally.preference(cells[j]) < 0 else -1.0 for j in chosen])
        rows["moving"] = torch.tensor([cells[j] in disagree for j in chosen])
        return rows

    return batch


def align(model, tokenizer, pairs: list[tuple[Task, Item]], tally: CellTally, disagree: dict[str, str], steps: int,
          lr: float, seed: int) -> tuple[int, dict[str, float]]:
    """Fine-tune the decision tokens until every cell decides its verdict (each moved cell on SETTLED of its
    prompts), checked every CHECK_EVERY steps, or `steps` run out -> (steps taken, thinks_per_cell after)."""
    import copy

    import torch

    reference = copy.deepcopy(model).eval().requires_grad_(False)
    batches = align_batches(tokenizer, pairs, tally, disagree, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    step, after = 0, thinks_per_cell(model, tokenizer, pairs)
    while step < steps:
        step += 1
        model.train()
        loss = align_loss(model, reference, batches(step))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % CHECK_EVERY == 0 or step == steps:
            model.eval()
            after = thinks_per_cell(model, tokenizer, pairs)
            settled = all(abs(after[c] - (1.0 if v.endswith("on") else 0.0)) <= 1 - SETTLED
                          for c, v in disagree.items())
            log.info("decision alignment step %d: loss %.3f; %s", step, loss.item(), "; ".join(
                f"{c} thinks {after[c]:.2f}" for c in disagree))
            if settled and not disagreements(tally, after):
                break
    model.eval()
    return step, after


def align_decisions(config: KatConfig, checkpoint: Path, data_dir: Path, out_dir: Path
                    ) -> tuple[Path, dict[str, Any]]:
    """Check the fine-tuned `checkpoint`'s decisions against the verdicts measured on it (RL prompts) and, where
    a cell disagrees, fine-tune its decision tokens (`coldstart.align_steps` steps at `coldstart.align_lr`) into
    `out_dir` -> (the checkpoint to keep: `out_dir`, or `checkpoint` when every cell agrees, and an account)."""
    import json

    from kat_core.data.dataset import read_pool
    from kat_core.model.checkpoint import KAT_META, load_checkpoint, save_checkpoint
    from kat_core.train.srpo import census

    cfg = config.coldstart
    pairs = read_pool(data_dir, "rl", config.tasks.benchmarks_dir)
    model, tokenizer, heads = load_checkpoint(checkpoint)
    model.eval()
    tally = tally_for(config.autothink)
    seconds = census(model, tokenizer, pairs, tally, config.srpo, config.autothink, config.seed)
    before = thinks_per_cell(model, tokenizer, pairs)
    disagree = disagreements(tally, before)
    account: dict[str, Any] = {"checked_on": len(pairs), "census_s": round(seconds, 1), "disagreed": disagree}
    if not disagree:
        log.info("cold start decisions: every cell of %d RL prompts decided as the fine-tuned model's verdicts",
                 len(pairs))
        return checkpoint, {**account, "trained_steps": 0}
    log.info("cold start decisions: %d cell(s) decided against the fine-tuned model's verdicts: %s; aligning",
             len(disagree), "; ".join(f"{c}: {v}" for c, v in disagree.items()))
    step, after = align(model, tokenizer, pairs, tally, disagree, cfg.align_steps, cfg.align_lr, config.seed)
    still = disagreements(tally, after)
    moved = {c for c in before if c in disagree or (before[c] > 0.5) != (after[c] > 0.5)}
    account.update(trained_steps=step, still_disagree=still,
                   thinks={c: {"before": round(before[c], 3), "after": round(after[c], 3)} for c in sorted(moved)})
    if still:
        log.warning("cold start decisions: still decided against the verdicts after %d steps: %s", step,
                    ", ".join(still))
    extra = json.loads((checkpoint / KAT_META).read_text()).get("extra", {})

    def keep_metrics(tmp: Path) -> None:  # the SFT's loss curve stays with the checkpoint it made
        if (checkpoint / "metrics.jsonl").is_file():
            shutil.copy(checkpoint / "metrics.jsonl", tmp / "metrics.jsonl")

    model.eval()
    save_checkpoint(out_dir, model, tokenizer, heads, extra=extra, write_more=keep_metrics)
    return out_dir, account

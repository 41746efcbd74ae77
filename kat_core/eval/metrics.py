"""Scoring verified responses: accuracy, pass@1, tokens, think-on rate, and mode-selection quality.

Pure functions over `ItemResult`s (no model, no I/O), so every number in a report can be checked by hand.

An evaluation mode is "auto" (the model chooses), "on" or "off" (forced by pre-filling the judge and the
mode token). Per item and evaluation mode there is one greedy response and `n` sampled ones.

Mode-selection quality, by the one decision criterion (kat_core.autothink): the value of mode m on an item is
`V_m = correct_m - token_cost * tokens_m / token_budget`, measured on the item's forced response in mode m
under the criterion's decoding (greedy: the greedy response; a temperature: the mean of the sampled ones);
think-off is right when `V_off >= V_on - delta`. Two oracles are reported:
  - hindsight: the right mode per item, knowing its outcomes (no selector can beat it);
  - feature cell: the right mode per prompt-visible cell (level and judge description, `autothink.cell_of`),
    by the criterion's cell rule (`autothink.CellTally`: the mean preference plus `tie_z` standard errors,
    a think-on edge within the noise is a tie, which thinks only when thinking is measurably more accurate;
    a cell under `min_cell` items takes its level's): the frontier
    a mode selector that sees only the request can reach. Beside it (`sign_rule`), the sign of each cell's
    mean alone, the rule before tie_z: it also knows which of the split's few items a direct answer missed.
The auto mode's choice is the mode token of its greedy response, valued with the same forced outcomes, so
the regret measures the choice alone: accuracy regret = mean(acc[oracle] - acc[choice]), token regret =
mean(t[choice] - t[oracle]), value regret likewise. A response without a mode token (choice "none") is
valued at accuracy 0 and the tokens it actually spent.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from kat_core.autothink import mode_value

MODES = ("auto", "on", "off")
TOKEN_KEYS = ("total", "judge", "think", "answer")


@dataclass
class Outcome:
    """One verified response."""

    mode: str | None  # the mode token the response carries ("on" | "off"), None when it has none
    correct: bool
    well_formed: bool
    tokens: dict[str, int]  # judge, think, answer, other and total tokens of the whole response
    finish_reason: str = "stop"
    # the raw model probability of the verdict word the response drew (one the model wrote itself; None for a
    # forced judge or none): below 0.5, a decision the model barely made (kat_core.verdict)
    verdict_p: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        return cls(**data)


@dataclass
class ItemResult:
    """An item's responses in each evaluation mode."""

    id: str
    suite: str
    level: int
    cell: str | None = None  # the prompt-visible feature cell (kat_core.autothink.cell_of)
    greedy: dict[str, Outcome] = field(default_factory=dict)  # evaluation mode -> greedy response
    sampled: dict[str, list[Outcome]] = field(default_factory=dict)  # evaluation mode -> n sampled responses

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ItemResult:
        return cls(
            id=data["id"], suite=data["suite"], level=int(data["level"]), cell=data.get("cell"),
            greedy={m: Outcome.from_dict(o) for m, o in data.get("greedy", {}).items()},
            sampled={m: [Outcome.from_dict(o) for o in os] for m, os in data.get("sampled", {}).items()},
        )


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def mode_metrics(results: list[ItemResult], mode: str) -> dict[str, Any]:
    """One evaluation mode over items: accuracy (greedy, pass@1 over the samples), mean tokens per segment,
    think-on rate, well-formed and truncated shares; all over the greedy responses except pass@1.

    pass@1 is the mean over items of c/n (c correct of n samples), the unbiased estimate; None without samples."""
    greedy = [r.greedy[mode] for r in results if mode in r.greedy]
    per_item = [r.sampled[mode] for r in results if r.sampled.get(mode)]
    return {
        "n": len(greedy),
        "accuracy": {
            "greedy": _r(_mean(o.correct for o in greedy)),
            "pass@1": _r(_mean(sum(o.correct for o in s) / len(s) for s in per_item)),
        },
        "mean_tokens": {k: _r(_mean(o.tokens.get(k, 0) for o in greedy), 2) for k in TOKEN_KEYS},
        "think_on_rate": _r(_mean(o.mode == "on" for o in greedy)),
        "well_formed_rate": _r(_mean(o.well_formed for o in greedy)),
        "truncated_rate": _r(_mean(o.finish_reason == "length" for o in greedy)),
    }


def by_level(results: list[ItemResult], modes: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{level: {mode: mode_metrics}} for each difficulty level present, in level order."""
    groups: dict[int, list[ItemResult]] = defaultdict(list)
    for r in results:
        groups[r.level].append(r)
    return {str(lvl): {m: mode_metrics(rs, m) for m in modes} for lvl, rs in sorted(groups.items())}


def _forced(r: ItemResult, mode: str, sampled: bool) -> tuple[float, float] | None:
    """(accuracy, total tokens) of a forced mode on one item: its greedy response, or (`sampled`, when there
    are samples) their mean."""
    responses = (r.sampled.get(mode) if sampled else None) or ([r.greedy[mode]] if mode in r.greedy else [])
    if not responses:
        return None
    return (sum(o.correct for o in responses) / len(responses),
            sum(o.tokens.get("total", 0) for o in responses) / len(responses))


def _summary(picks: list[str], outcomes: list[dict[str, tuple[float, float]]], crit) -> dict[str, float | None]:
    acc = [o[m][0] if m in o else 0.0 for m, o in zip(picks, outcomes, strict=True)]
    tok = [o[m][1] for m, o in zip(picks, outcomes, strict=True)]
    return {"accuracy": _mean(acc), "mean_tokens": _mean(tok), "think_on_rate": _mean(m == "on" for m in picks),
            "value": _mean(mode_value(a, t, crit) for a, t in zip(acc, tok, strict=True))}


def _preferences(results: list[ItemResult], crit, need_auto: bool) -> tuple[list[ItemResult], list[dict], list[float]]:
    """The items with both forced modes measured (and auto's greedy response, when `need_auto`) -> (those items,
    their forced outcomes {"on", "off": (accuracy, tokens)}, their preference_off)."""
    from kat_core.autothink import preference_off

    sampled = crit.temperature > 0
    rows, outcomes = [], []
    for r in results:
        on, off = _forced(r, "on", sampled), _forced(r, "off", sampled)
        if (not need_auto or "auto" in r.greedy) and on is not None and off is not None:
            rows.append(r)
            outcomes.append({"on": on, "off": off})
    return rows, outcomes, [preference_off(o["off"], o["on"], crit) for o in outcomes]


def _cell_rows(rows: list[ItemResult], outcomes: list[dict], prefs: list[float]) -> list[tuple[str, int, float, float]]:
    """(cell, level, preference_off, accuracy_on - accuracy_off) per item, as CellTally takes them."""
    return [(r.cell or f"L{r.level}", r.level, p, o["on"][0] - o["off"][0])
            for r, o, p in zip(rows, outcomes, prefs, strict=True)]


def decision_confidence(outcomes: list[Outcome], weak_below: float = 0.5) -> dict[str, Any]:
    """How firmly auto's greedy verdicts were drawn: over the responses whose verdict word the model wrote
    (`Outcome.verdict_p`), how many it drew at a raw probability under `weak_below` (a decision it barely made,
    e.g. a verdict smeared between neighbouring cells; the verdict guard keeps such responses well formed),
    and the lowest."""
    ps = [o.verdict_p for o in outcomes if o.verdict_p is not None]
    return {"n": len(ps), "weak": sum(p < weak_below for p in ps), "weak_below": weak_below,
            "min_p": min(ps) if ps else None}


def mode_selection(results: list[ItemResult], crit=None, calibration: list[ItemResult] | None = None
                   ) -> dict[str, Any] | None:
    """Auto's mode choices against the hindsight and the feature-cell oracles (see the module doc): each
    one's accuracy, tokens, think-on rate and value, auto's regret and agreement against each, and the
    confusion against hindsight. None unless auto and both forced modes were evaluated.

    `calibration`: other items of the suite measured in both forced modes (`evaluate`'s `oracle_items`). The
    feature-cell oracle then decides each cell on them and is applied to `results`: what a selector tuned on
    held-out measurements reaches on this split, without the split's own noise (a cell of 24 items cannot
    show an edge of 0.15 from a tie; `benchmarks/cell_census.py`). The oracle decided on the split itself is
    reported beside it (`in_split`). A cell the calibration never met takes its level's verdict there."""
    from kat_core.autothink import cell_tally, decide
    from kat_core.config import AutoThinkConfig

    crit = crit or AutoThinkConfig()
    rows, outcomes, prefs = _preferences(results, crit, need_auto=True)
    if not rows:
        return None
    hindsight = [decide(p) for p in prefs]
    cell_rows = _cell_rows(rows, outcomes, prefs)
    split_tally = cell_tally(cell_rows, crit)
    decider, source, decided_items = split_tally, "split", len(rows)
    if calibration:
        cal_rows, cal_outcomes, cal_prefs = _preferences(calibration, crit, need_auto=False)
        if cal_rows:
            decider, source, decided_items = cell_tally(_cell_rows(cal_rows, cal_outcomes, cal_prefs), crit), \
                "calibration", len(cal_rows)
    cells = {cell: (decider if decider.knows(cell, level) else split_tally).stats_for(cell, level)
             for cell, level, *_ in cell_rows}
    by_cell = [cells[cell]["mode"] for cell, *_ in cell_rows]
    split_modes = split_tally.modes()
    by_split = [split_modes[cell] for cell, *_ in cell_rows]
    # the in-sample sign of each cell's mean alone (no tie band, no level fallback): an upper bound that
    # knows the split's single misses, reported beside the criterion's cell oracle
    sign_modes = cell_tally(cell_rows, crit.model_copy(update={"min_cell": 1, "tie_z": 0.0})).modes()
    by_sign = [sign_modes[cell] for cell, *_ in cell_rows]
    choices = []
    for r, o in zip(rows, outcomes, strict=True):
        choice = r.greedy["auto"].mode
        if choice not in ("on", "off"):
            choice = "none"
            o["none"] = (0.0, r.greedy["auto"].tokens.get("total", 0))
        choices.append(choice)
    chosen = _summary(choices, outcomes, crit)

    def against(picks: list[str]) -> dict[str, Any]:
        oracle = _summary(picks, outcomes, crit)
        return {
            "oracle": {k: _r(v, 2 if k == "mean_tokens" else 4) for k, v in oracle.items()},
            "agreement": _r(_mean(c == p for c, p in zip(choices, picks, strict=True))),
            "regret": {"accuracy": _r(oracle["accuracy"] - chosen["accuracy"]),
                       "tokens": _r(chosen["mean_tokens"] - oracle["mean_tokens"], 2),
                       "value": _r(oracle["value"] - chosen["value"])},
        }

    confusion = {f"oracle_{o}": {"chose_off": 0, "chose_on": 0, "chose_none": 0} for o in ("off", "on")}
    for o, c in zip(hindsight, choices, strict=True):
        confusion[f"oracle_{o}"][f"chose_{c}"] += 1
    hind, cell = against(hindsight), against(by_cell)
    per_cell: dict[str, dict[str, Any]] = {}  # what auto did per cell
    for (key, *_), c in zip(cell_rows, choices, strict=True):
        entry = per_cell.setdefault(key, {"on": 0, "none": 0})
        entry["on"] += c == "on"
        entry["none"] += c == "none"
    split_counts = {k: split_tally.count(k) for k in per_cell}
    by_cell_report = {k: {"n": split_counts[k], "oracle": cells[k]["mode"], "decided_on_n": cells[k]["n"],
                          "mean_preference_off": cells[k]["mean"], "error": cells[k]["error"],
                          "decided_by": cells[k]["by"],
                          "preference_off": cells[k]["preference_off"],
                          "auto_think_on_rate": _r(e["on"] / split_counts[k]),
                          "auto_none_rate": _r(e["none"] / split_counts[k])}
                      for k, e in sorted(per_cell.items())}
    return {
        "n": len(rows),
        "decisions": decision_confidence([r.greedy["auto"] for r in rows]),
        "criterion": {"token_cost": crit.token_cost, "token_budget": crit.token_budget, "delta": crit.delta,
                      "decoding": crit.decoding, "min_cell": crit.min_cell, "tie_z": crit.tie_z,
                      "accuracy_first": crit.accuracy_first},
        "delta": crit.delta,
        "choice": {k: _r(v, 2 if k == "mean_tokens" else 4) for k, v in chosen.items()},
        # hindsight: the per-item oracle (kept under the schema's original keys)
        "oracle": hind["oracle"], "agreement": hind["agreement"], "regret": hind["regret"], "confusion": confusion,
        "feature_cell": {**cell, "cells": len(cells), "by_cell": by_cell_report,
                         "decided_on": {"source": source, "items": decided_items},
                         **({"in_split": against(by_split)} if source == "calibration" else {}),
                         "sign_rule": against(by_sign)},
    }

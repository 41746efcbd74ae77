"""Scoring verified responses: accuracy, pass@1, tokens, think-on rate, and mode-selection quality.

Pure functions over `ItemResult`s (no model, no I/O), so every number in a report can be checked by hand.

An evaluation mode is "auto" (the model chooses), "on" or "off" (forced by pre-filling the judge and the
mode token). Per item and evaluation mode there is one greedy response and `n` sampled ones.

Mode-selection quality. The oracle mode of an item is the cheapest mode that is correct for it, estimated
from the forced responses of both modes: with `p_on`, `p_off` the forced modes' accuracies on the item
(the share of its sampled responses that are correct; its greedy response when nothing was sampled),
the oracle is think-off when `p_off >= p_on - delta`, else think-on. Think-off is the cheap mode, so it wins
ties, including "neither mode is ever right" (thinking would only spend tokens). `delta` (default 0) is the
accuracy a user trades for skipping the reasoning, as in the cold start's majority vote.
The auto mode's choice is the mode token of its greedy response. The choice is valued with the same forced
estimates, so the regret measures the choice alone, not how well the model then answers in auto mode:
  accuracy regret = mean(p[oracle] - p[choice]),   token regret = mean(t[choice] - t[oracle]),
where `t` is the forced mode's mean response tokens on the item. A response without a mode token (choice
"none") is valued at accuracy 0 and the tokens it actually spent.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        return cls(**data)


@dataclass
class ItemResult:
    """An item's responses in each evaluation mode."""

    id: str
    suite: str
    level: int
    greedy: dict[str, Outcome] = field(default_factory=dict)  # evaluation mode -> greedy response
    sampled: dict[str, list[Outcome]] = field(default_factory=dict)  # evaluation mode -> n sampled responses

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ItemResult:
        return cls(
            id=data["id"], suite=data["suite"], level=int(data["level"]),
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


def _estimate(r: ItemResult, mode: str) -> tuple[float, float] | None:
    """(accuracy, mean total tokens) of a forced mode on one item: its samples, else its greedy response."""
    responses = r.sampled.get(mode) or ([r.greedy[mode]] if mode in r.greedy else [])
    if not responses:
        return None
    return (sum(o.correct for o in responses) / len(responses),
            sum(o.tokens.get("total", 0) for o in responses) / len(responses))


def oracle_mode(r: ItemResult, delta: float = 0.0) -> str | None:
    """The cheapest mode correct for this item (see the module doc); None without both forced modes."""
    on, off = _estimate(r, "on"), _estimate(r, "off")
    if on is None or off is None:
        return None
    return "off" if off[0] >= on[0] - delta else "on"


def mode_selection(results: list[ItemResult], delta: float = 0.0) -> dict[str, Any] | None:
    """Auto's mode choices against the oracle: agreement, confusion, the oracle's and the choices' estimated
    accuracy and tokens, and the regret. None unless auto and both forced modes were evaluated."""
    rows = [r for r in results if "auto" in r.greedy and oracle_mode(r, delta) is not None]
    if not rows:
        return None
    confusion = {f"oracle_{o}": {"chose_off": 0, "chose_on": 0, "chose_none": 0} for o in ("off", "on")}
    agree, oracle_acc, oracle_tok, choice_acc, choice_tok = [], [], [], [], []
    for r in rows:
        oracle = oracle_mode(r, delta)
        choice = r.greedy["auto"].mode
        confusion[f"oracle_{oracle}"][f"chose_{choice or 'none'}"] += 1
        agree.append(choice == oracle)
        acc, tok = _estimate(r, oracle)
        oracle_acc.append(acc)
        oracle_tok.append(tok)
        if choice in ("on", "off"):
            acc, tok = _estimate(r, choice)
        else:
            acc, tok = 0.0, r.greedy["auto"].tokens.get("total", 0)
        choice_acc.append(acc)
        choice_tok.append(tok)
    oracle = {
        "accuracy": _mean(oracle_acc), "mean_tokens": _mean(oracle_tok),
        "think_on_rate": _mean(oracle_mode(r, delta) == "on" for r in rows),
    }
    chosen = {"accuracy": _mean(choice_acc), "mean_tokens": _mean(choice_tok)}
    return {
        "n": len(rows),
        "delta": delta,
        "agreement": _r(_mean(agree)),
        "confusion": confusion,
        "oracle": {k: _r(v, 2 if k == "mean_tokens" else 4) for k, v in oracle.items()},
        "choice": {k: _r(v, 2 if k == "mean_tokens" else 4) for k, v in chosen.items()},
        "regret": {
            "accuracy": _r(oracle["accuracy"] - chosen["accuracy"]),
            "tokens": _r(chosen["mean_tokens"] - oracle["mean_tokens"], 2),
        },
    }

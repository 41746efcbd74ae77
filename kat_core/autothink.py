"""The one decision criterion: when is thinking worth its tokens? (DESIGN.md, "One decision criterion".)

The value of answering a prompt in mode m is

    V_m = accuracy_m - token_cost * tokens_m / token_budget

and think-off is the right mode when `V_off >= V_on - delta` (ties go to the cheap mode, as in KAT's HiPO
recipe). `preference_off = V_off - V_on + delta` says by how much: >= 0 means think-off. The cold start's
labels, the RL's decision reward and the evaluation's oracles all call these functions, with accuracies and
tokens measured under the decoding the evaluation uses (`autothink.decoding`: greedy by default).

A *feature cell* is what a mode selector can see of a prompt before answering: its level and the judge's
description of it ("sum, 2 steps", "product plus sum, 7 steps, carries"). The best mode per cell, from the
summed preferences of the cell's prompts, is the frontier a selector can reach (the feature-cell oracle);
the best mode per prompt, knowing the outcomes, is the hindsight oracle.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from kat_core.config import AutoThinkConfig
from kat_core.data.judge import describe


def mode_value(accuracy: float, tokens: float, cfg: AutoThinkConfig) -> float:
    return accuracy - cfg.token_cost * tokens / cfg.token_budget


def preference_off(off: tuple[float, float], on: tuple[float, float], cfg: AutoThinkConfig) -> float:
    """V_off - V_on + delta from (accuracy, tokens) per mode; >= 0: think-off is right."""
    return mode_value(*off, cfg) - mode_value(*on, cfg) + cfg.delta


def decide(preference: float) -> str:
    """The mode a preference (`preference_off`, or a sum of them over a cell) picks; ties go to think-off."""
    return "off" if preference >= -1e-12 else "on"


def cell_of(features: dict[str, Any]) -> str:
    """The prompt-visible cell of a request: its level and the judge's description of it."""
    level = features.get("difficulty")
    return f"L{level} {describe(features)}" if level is not None else describe(features)


class CellTally:
    """Preferences per feature cell: the mean `preference_off` of a cell's prompts, or its level's mean when
    the cell has fewer than `min_cell` of them (too few prompts to tell it apart)."""

    def __init__(self, min_cell: int = 1) -> None:
        self.min_cell = min_cell
        self._cell: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self._level: dict[int, list[float]] = defaultdict(lambda: [0.0, 0])
        self._level_of: dict[str, int] = {}

    def add(self, cell: str, level: int, pref: float) -> None:
        for tally in (self._cell[cell], self._level[level]):
            tally[0] += pref
            tally[1] += 1
        self._level_of[cell] = level

    def count(self, cell: str) -> int:
        return int(self._cell[cell][1]) if cell in self._cell else 0

    def preference(self, cell: str) -> float:
        total, n = self._cell[cell] if self.count(cell) >= self.min_cell else self._level[self._level_of[cell]]
        return total / n

    def summary(self) -> dict[str, dict[str, Any]]:
        """{cell: {n, preference_off (the one the decision uses), mode}}, for the RL stage's report."""
        return {cell: {"n": self.count(cell), "preference_off": round(pref, 4), "mode": decide(pref)}
                for cell in sorted(self._cell) for pref in (self.preference(cell),)}

    def modes(self) -> dict[str, str]:
        return {cell: decide(self.preference(cell)) for cell in self._cell}


def cell_modes(rows: Iterable[tuple[str, int, float]], min_cell: int = 1) -> dict[str, str]:
    """{cell: mode} from (cell, level, preference_off) rows: the sign of the cell's mean preference; a cell
    with fewer than `min_cell` rows takes its level's verdict."""
    tally = CellTally(min_cell)
    for cell, level, pref in rows:
        tally.add(cell, level, pref)
    return tally.modes()

"""The one decision criterion: when is thinking worth its tokens? (DESIGN.md, "One decision criterion".)

The value of answering a prompt in mode m is

    V_m = accuracy_m - token_cost * tokens_m / token_budget

and think-off is the right mode when `V_off >= V_on - delta` (ties go to the cheap mode, as in KAT's HiPO
recipe). `preference_off = V_off - V_on + delta` says by how much: >= 0 means think-off. The cold start's
labels, the RL's decision reward and the evaluation's oracles all call these functions, with accuracies and
tokens measured under the decoding the evaluation uses (`autothink.decoding`: greedy by default).

A *feature cell* is what a mode selector can see of a prompt before answering: its level and the judge's
description of it ("sum, 2 steps", "product plus sum, 7 steps, carries"). The best mode per cell, from the
preferences of the cell's prompts, is the frontier a selector can reach (the feature-cell oracle); the best
mode per prompt, knowing the outcomes, is the hindsight oracle. A cell is decided by its mean preference
plus `tie_z` standard errors (CellTally): a think-on edge within the measurement's noise is a tie, and ties
go to think-off unless thinking is measurably more accurate (`accuracy_first`); a cell with fewer than
`min_cell` prompts takes its level's verdict. The same rule serves
the cold start's labels, the RL's census and the evaluation's cell oracle.
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


class _Moments:
    """Running sum, sum of squares and count of one quantity: its mean and the standard error of the mean."""

    __slots__ = ("total", "squares", "n")

    def __init__(self) -> None:
        self.total, self.squares, self.n = 0.0, 0.0, 0

    def add(self, x: float) -> None:
        self.total, self.squares, self.n = self.total + x, self.squares + x * x, self.n + 1

    def mean_and_error(self) -> tuple[float, float]:
        mean = self.total / self.n
        if self.n < 2:
            return mean, 0.0
        return mean, (max(self.squares - self.n * mean * mean, 0.0) / (self.n - 1) / self.n) ** 0.5


class CellTally:
    """Preferences per feature cell, and the mode each cell's measurements call for.

    A cell thinks where thinking's edge stands out of the measurement's noise: its mean `preference_off` plus
    `tie_z` standard errors of that mean is below 0 (one-sided, z = `tie_z`). It answers directly where think-off's
    edge does (the mean minus tie_z errors is >= 0). Between the two the values are a tie, and the tie is broken
    by accuracy first (`accuracy_first`, given each prompt's accuracy gap `accuracy_on - accuracy_off`): the
    cell thinks when think-on is measurably more accurate (its mean accuracy edge less tie_z standard errors is
    above 0), otherwise it goes to the cheap mode. A cell with fewer than `min_cell` prompts takes its
    level's values under the same rule. (Letting every cell within the noise take its level's verdict was tried:
    on pipeline seed 1 it made a level-4 cell at +0.024 +- 0.020 think with its level, where the evaluation
    split's cell oracle answered directly.)
    Why the band: a cell holds a few dozen prompts, each a 0/1 outcome per mode, so near the criterion's threshold
    one wrong direct answer in 16 prompts (-0.06) flips the sign of the mean alone. Measured on the demo student:
    the sign picked think-on for a level-4 cell of a 200-item test split whose 91 fresh items preferred
    think-off by +0.047; over resampled 500-item splits the sign rule's cell oracle disagreed with the
    population's by more than 0.03 x think-on tokens in half of them (README, benchmarks/cell_census.py).
    Why accuracy breaks the tie: the product is auto "as accurate as thinking, at far fewer tokens", and a value
    tie can hide a measurable loss: pipeline seed 1's "L4 sum, 3 steps, carries, 3-digit result" (99 labelled
    prompts, direct answers right 0.91 of the time, mean -0.029 +- 0.029; accuracy edge 0.09 +- 0.03) went to
    think-off and cost its RL models 0.010-0.014 of accuracy against forced thinking; one miss in 16 (0.06 +-
    0.06) is no such loss. (Requiring the edge to exceed delta as well was tried: it left pipeline seed 2's
    "L4 difference, 3 steps, carries", 0.058 +- 0.025 on 86 prompts, direct, and auto 0.014 below thinking.)"""

    def __init__(self, min_cell: int = 1, tie_z: float = 0.0, accuracy_first: bool = False) -> None:
        self.min_cell = min_cell
        self.tie_z = tie_z
        self.accuracy_first = accuracy_first
        # per cell and per level: the preferences, and the accuracy gaps (on - off)
        self._cell: dict[str, tuple[_Moments, _Moments]] = defaultdict(lambda: (_Moments(), _Moments()))
        self._level: dict[int, tuple[_Moments, _Moments]] = defaultdict(lambda: (_Moments(), _Moments()))
        self._level_of: dict[str, int] = {}

    def add(self, cell: str, level: int, pref: float, accuracy_gap: float | None = None) -> None:
        """One prompt: its cell, level, `preference_off`, and (for the accuracy tie-break) accuracy_on - off."""
        for prefs, gaps in (self._cell[cell], self._level[level]):
            prefs.add(pref)
            if accuracy_gap is not None:
                gaps.add(accuracy_gap)
        self._level_of[cell] = level

    def count(self, cell: str) -> int:
        return self._cell[cell][0].n if cell in self._cell else 0

    def _decides(self, cell: str) -> bool:
        """Whether the cell has prompts enough (min_cell) to decide alone; otherwise its level decides."""
        return self.count(cell) >= self.min_cell

    def _deciding(self, cell: str) -> tuple[_Moments, _Moments]:
        return self._cell[cell] if self._decides(cell) else self._level[self._level_of[cell]]

    def _value(self, moments: tuple[_Moments, _Moments]) -> float:
        prefs, gaps = moments
        mean, error = prefs.mean_and_error()
        band = self.tie_z * error
        if mean + band < 0 or mean - band >= 0 or not (self.accuracy_first and gaps.n):
            return mean + band  # thinking's edge stands out (< 0), or think-off's does, or a tie to think-off
        gap, gap_error = gaps.mean_and_error()
        # a value tie: thinking when it is measurably more accurate (then the value think-off can be sure of)
        return mean - band if gap - self.tie_z * gap_error > 0 else mean + band

    def preference(self, cell: str) -> float:
        """The cell's decision value (>= 0: think-off): see the class doc."""
        return self._value(self._deciding(cell))

    def knows(self, cell: str, level: int) -> bool:
        """Whether this tally can decide `cell`: it measured the cell, or at least its level."""
        return cell in self._cell or level in self._level

    def stats_for(self, cell: str, level: int) -> dict[str, Any]:
        """`summary()`'s entry for a cell, also for one this tally never measured (n 0: its level decides, which
        it must know), as when the evaluation's cell oracle is decided on other items than those it judges."""
        if cell in self._cell:
            return self.summary_of(cell)
        return self._entry(self._level[level], 0, "level", self._value(self._level[level]))

    def summary_of(self, cell: str) -> dict[str, Any]:
        return self._entry(self._cell[cell], self.count(cell), "cell" if self._decides(cell) else "level",
                           self.preference(cell))

    @staticmethod
    def _entry(own: tuple[_Moments, _Moments], n: int, by: str, pref: float) -> dict[str, Any]:
        """One summary entry: `own` preferences' mean and error, who decided (`by`), the decision value `pref`."""
        mean, error = own[0].mean_and_error()
        return {"n": n, "mean": round(mean, 4), "error": round(error, 4), "by": by,
                "preference_off": round(pref, 4), "mode": decide(pref)}

    def summary(self) -> dict[str, dict[str, Any]]:
        """{cell: {n, mean and error (the cell's own mean preference_off and its standard error), by ("cell", or
        "level" when the cell is too small), preference_off (the decision value), mode}}, for the cold
        start's labels and the RL stage's and the evaluation's reports."""
        return {cell: self.summary_of(cell) for cell in sorted(self._cell)}

    def modes(self) -> dict[str, str]:
        return {cell: decide(self.preference(cell)) for cell in self._cell}


def tally_for(crit: AutoThinkConfig) -> CellTally:
    """An empty CellTally under the criterion's cell rules (min_cell, tie_z, accuracy_first)."""
    return CellTally(crit.min_cell, crit.tie_z, crit.accuracy_first)


def cell_tally(rows: Iterable[tuple], crit: AutoThinkConfig) -> CellTally:
    """The criterion's CellTally over (cell, level, preference_off[, accuracy_on - accuracy_off]) rows."""
    tally = tally_for(crit)
    for row in rows:
        tally.add(*row)
    return tally

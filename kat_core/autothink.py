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


def cell_modes(rows: Iterable[tuple[str, int, float]], min_cell: int = 1) -> dict[str, str]:
    """{cell: mode} from (cell, level, preference_off) rows: the sign of the cell's mean preference; a cell
    with fewer than `min_cell` rows takes its level's verdict (too few prompts to tell it apart)."""
    by_cell: dict[str, list[float]] = defaultdict(list)
    by_level: dict[int, list[float]] = defaultdict(list)
    level_of: dict[str, int] = {}
    for cell, level, pref in rows:
        by_cell[cell].append(pref)
        by_level[level].append(pref)
        level_of[cell] = level
    return {cell: decide(sum(prefs) / len(prefs) if len(prefs) >= min_cell
                         else sum(by_level[level_of[cell]]) / len(by_level[level_of[cell]]))
            for cell, prefs in by_cell.items()}

"""The tagging pipeline's scorer: how complex is a request, and so which regime does it start in?

Complexity in [0, 1] from intent features (steps, operand sizes, multi-digit products); when a model's
measured direct-answer (think-off) solve rate is given, it is blended in, so the tags follow what the
model can actually do without thinking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _clip(x: float) -> float:
    return max(0.0, min(1.0, x))


def feature_complexity(features: dict[str, Any]) -> float:
    """Complexity from intent features alone.

    Weights: trace length counts (each step is work a direct answer must do silently); a carry and a
    multi-digit product each add more, because they are where direct answers of small models break
    first. A one-digit fact scores 0; a two-digit sum without a carry about 0.14, with one about 0.34; a
    carried product plus a sum 0.7."""
    steps_term = _clip((features.get("steps", 0) - 2) / 10)
    digits_term = _clip((features.get("max_digits", 1) - 1) / 2)
    product_term = 1.0 if features.get("has_product") and features.get("max_digits", 1) > 1 else 0.0
    carry_term = 1.0 if features.get("carries", 0) > 0 else 0.0
    if "max_digits" not in features:  # non-arith families: difficulty level is the best feature we have
        return _clip(0.5 * steps_term + 0.5 * (features.get("difficulty", 3) - 1) / 4)
    return _clip(0.4 * steps_term + 0.2 * digits_term + 0.2 * product_term + 0.2 * carry_term)


@dataclass
class Tagger:
    threshold: float = 0.3
    solve_rate_weight: float = 0.5  # how much a measured solve rate counts against the features

    def complexity(self, features: dict[str, Any], solve_rate: float | None = None) -> float:
        score = feature_complexity(features)
        if solve_rate is not None:
            score = (1 - self.solve_rate_weight) * score + self.solve_rate_weight * (1 - _clip(solve_rate))
        return score

    def mode(self, features: dict[str, Any], solve_rate: float | None = None) -> str:
        """"off" for simple requests (complexity below the threshold), else "on"."""
        return "off" if self.complexity(features, solve_rate) < self.threshold else "on"

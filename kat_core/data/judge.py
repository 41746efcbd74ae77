"""Intent-aware judge text: a short analysis of the request that explains the mode it leads to.

The judge is written from intent features (family, number of steps, operand sizes), not from the
difficulty label, so a model learns *why* a request needs thinking. Keep it short: it is paid for in
tokens on every request.
"""

from __future__ import annotations

from typing import Any

_OP_WORDS = {"+": "sum", "-": "difference", "*": "product"}


def describe(features: dict[str, Any]) -> str:
    """A few words on what the request is, e.g. "product plus sum, 7 steps, carries"."""
    if features.get("family") == "arith":
        ops = features.get("op_kinds") or []
        what = " plus ".join(_OP_WORDS.get(o, o) for o in ops) or "arithmetic"
        steps = features.get("steps", 0)
        # the carry is what a direct answer cannot do silently: the one feature the mode hinges on
        carried = ", carries" if features.get("carries") else ""
        return f"{what}, {steps} step{'s' if steps != 1 else ''}{carried}"
    parts = [str(features.get("family", "task"))]
    if features.get("difficulty"):
        parts.append(f"level {features['difficulty']}")
    if features.get("steps"):
        parts.append(f"{features['steps']} steps")
    return ", ".join(parts)


def judge_text(features: dict[str, Any], mode: str) -> str:
    """The judge for `mode` ("on" or "off") on a request with these intent features."""
    # short on purpose: the judge is paid for in tokens on every request, in both modes
    return f"{describe(features)}: {'think' if mode == 'on' else 'direct'}"

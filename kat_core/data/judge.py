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
        # a sum or difference whose result is shorter or longer than its operands (66-61=5, 23+85=108): the
        # digit a direct answer must drop or add silently; measured as where the demo student's direct
        # answers failed at levels 2-3 (9 of its 10 misses there were differences whose tens cancel)
        digits, longest = features.get("result_digits"), features.get("max_digits")
        odd_length = "*" not in ops and digits and longest and digits != longest
        length = f", {digits}-digit result" if odd_length else ""
        return f"{what}, {steps} step{'s' if steps != 1 else ''}{carried}{length}"
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

"""Cron expressions as both back ends take them: the classic 5 fields, checked before anything is stored."""

from kat_core.errors import Invalid

_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
                ("day of week", 0, 7))
_CRON_NAMES = {3: "jan feb mar apr may jun jul aug sep oct nov dec".split(), 4: "sun mon tue wed thu fri sat".split()}


def check_cron(expr: str) -> str:
    """The expression, normalised, if it is a valid 5-field cron (minute hour day month weekday); else
    `Invalid` that says which field is wrong. Both back ends check it before anything is stored."""
    parts = expr.split()
    if len(parts) != 5:
        raise Invalid(f"bad cron {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week), "
                       f"got {len(parts)}")
    for i, (part, (what, lo, hi)) in enumerate(zip(parts, _CRON_FIELDS, strict=True)):
        names = _CRON_NAMES.get(i, [])

        def value(text: str, names: list[str] = names, lo: int = lo, hi: int = hi) -> int:
            if text.lower() in names:
                return names.index(text.lower()) + (1 if lo == 1 else 0)
            if not text.isdigit() or not lo <= int(text) <= hi:
                raise ValueError(text)
            return int(text)

        try:
            for item in part.split(","):
                base, _, step = item.partition("/")
                if step and (not step.isdigit() or int(step) == 0):
                    raise ValueError(step)
                if base != "*":
                    first, _, last = base.partition("-")
                    if last and value(first) > value(last):
                        raise ValueError(base)
                    value(first)
        except ValueError:
            raise Invalid(f"bad cron {expr!r}: {what} field {part!r} "
                           f"(allowed: {lo}-{hi}, *, a-b, */n and lists of them)") from None
    return " ".join(parts)


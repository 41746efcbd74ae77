"""The promotion gate: what it reads from an evaluation report (`EvalSummary`), its one configuration
(`Margins`, from the config's `registry` section) and its verdict (`gate`). Pure functions: the registry
(kat_core.platform.registry) applies them to MLflow versions, the dashboard previews them."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kat_core.errors import KatError

if TYPE_CHECKING:  # the config is pydantic: built only where a config is read
    from kat_core.config import RegistryConfig



@dataclass(frozen=True)
class EvalSummary:
    """What the gate reads from an evaluation report: one mode's overall accuracy, mean tokens and share of
    well-formed responses (None: the report has none), and a digest of the items they were measured on (two
    summaries only compare when the items match)."""

    accuracy: float
    mean_tokens: float
    n: int = 0
    items_digest: str | None = None
    mode: str = "auto"
    well_formed: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvalSummary:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Margins:
    """acc_margin: accuracies closer than this (absolute) count as equal; tok_margin: "fewer tokens" means at
    least this fraction fewer (relative, so the same margin fits smoke and cluster lengths); min_accuracy and
    min_well_formed: the floor any champion, the first one too, must reach (a model that answers nothing in
    the grammar, or nothing right, is never crowned). The defaults are RegistryConfig's."""

    acc_margin: float = 0.01
    tok_margin: float = 0.05
    min_accuracy: float = 0.05
    min_well_formed: float = 0.5

    @classmethod
    def from_config(cls, registry: RegistryConfig, *, acc_margin: float | None = None,
                    tok_margin: float | None = None) -> Margins:
        """The gate's one configuration: the config's `registry` section, either margin overridable per call.
        The pipeline's register stage, the CLI and the dashboard all build their margins here."""
        return cls(acc_margin=registry.acc_margin if acc_margin is None else float(acc_margin),
                   tok_margin=registry.tok_margin if tok_margin is None else float(tok_margin),
                   min_accuracy=registry.min_accuracy, min_well_formed=registry.min_well_formed)


def summary_from_report(report: dict[str, Any] | EvalSummary, mode: str = "auto") -> EvalSummary:
    """The gate's view of an evaluation report: `mode`'s overall accuracy and mean tokens.

    Accepted layouts (adapt here, in one place): the evaluation's report.json ("kat-eval-report/2":
    overall.<mode>.accuracy.greedy, overall.<mode>.mean_tokens.total, overall.<mode>.n, items); a flat
    {"accuracy", "mean_tokens", "items"}; the mode's block under "modes" or the mode's own key; or only
    per-suite blocks {"suites": {suite: {"modes": {mode: {...}}}}}, averaged weighted by each suite's n.
    A metric given as a dict takes its "greedy" (accuracy) or "total" (tokens) entry."""
    if isinstance(report, EvalSummary):
        return report
    items = report.get("items")
    digest = items_digest(items) if items else report.get("items_digest")
    for block in (report.get("overall", {}).get(mode) if isinstance(report.get("overall"), dict) else None,
                  (report.get("modes") or {}).get(mode), report.get(mode), report.get("overall"), report):
        if isinstance(block, dict) and "accuracy" in block:
            n = int(block.get("n") or report.get("n") or (len(items) if items else 0))
            return EvalSummary(_metric(block["accuracy"], "greedy"), _metric(_tokens(block), "total"), n,
                               digest, mode, _well_formed([block]))
    suites = report.get("suites")
    if isinstance(suites, dict):
        blocks = [s.get("modes", s) for s in suites.values() if isinstance(s, dict)]
        rows = [b[mode] for b in blocks if isinstance(b.get(mode), dict)]
        if rows:
            weights = [max(int(r.get("n") or 1), 1) for r in rows]
            total = sum(weights)
            acc = sum(w * _metric(r["accuracy"], "greedy") for w, r in zip(weights, rows, strict=True)) / total
            tok = sum(w * _metric(_tokens(r), "total") for w, r in zip(weights, rows, strict=True)) / total
            return EvalSummary(acc, tok, total, digest, mode, _well_formed(rows, weights))
    raise KatError(f"evaluation report has no accuracy/mean_tokens for mode {mode!r} "
                   f"(top-level keys: {', '.join(sorted(report)) or 'none'})")


def _well_formed(blocks: list[dict[str, Any]], weights: list[int] | None = None) -> float | None:
    """The (weighted) share of well-formed responses of the blocks; None when any block lacks it."""
    rates = [b.get("well_formed_rate") for b in blocks]
    if not rates or any(r is None for r in rates):
        return None
    weights = weights or [1] * len(rates)
    return sum(w * _metric(r, "greedy") for w, r in zip(weights, rates, strict=True)) / sum(weights)


def _tokens(block: dict[str, Any]) -> Any:
    for key in ("mean_tokens", "tokens", "mean_total_tokens"):
        if key in block:
            return block[key]
    raise KatError(f"evaluation block has accuracy but no mean_tokens (keys: {', '.join(sorted(block))})")


def _metric(value: Any, prefer: str) -> float:
    """A number, or the `prefer` entry of a dict of variants (accuracy {"greedy", "pass@1"}, tokens {"total",
    "think", "answer"})."""
    if isinstance(value, dict):
        value = value.get(prefer, value.get("mean"))
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):  # NaN passes every `<` floor and fails every comparison with a champion
        raise KatError(f"evaluation report: expected a finite number, got {value!r}")
    return number


def items_digest(items: list[Any]) -> str:
    """Order-free digest of the evaluated items: their ids (or the items themselves when they have none)."""
    keys = sorted(
        json.dumps(i.get("id", i.get("item_id", i)) if isinstance(i, dict) else i, sort_keys=True, default=str)
        for i in items
    )
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def below_floor(cand: EvalSummary, m: Margins) -> str | None:
    """Why `cand` may not be champion whatever the champion is (None: it reaches the floors)."""
    if cand.well_formed is not None and cand.well_formed < m.min_well_formed:
        return (f"not well-formed: {cand.well_formed:.1%} of its answers follow the response grammar, below the "
                f"minimum {m.min_well_formed:.0%} (registry.min_well_formed)")
    if cand.accuracy < m.min_accuracy:
        return (f"accuracy {cand.accuracy:.4f} is below the minimum {m.min_accuracy} (registry.min_accuracy)")
    return None


def gate(
    candidate: dict[str, Any] | EvalSummary,
    champion: dict[str, Any] | EvalSummary | None,
    margins: Margins | None = None,
) -> tuple[bool, str]:
    """Refuse a candidate below the floors (min_well_formed, min_accuracy), the first one too. Else pass when
    there is no champion; when the candidate has higher accuracy (by more than acc_margin) at no more mean
    tokens; or equal accuracy (within acc_margin) with at least tok_margin fewer tokens."""
    m = margins or Margins()
    cand = summary_from_report(candidate)
    floor = below_floor(cand, m)
    if floor:
        return False, floor
    if champion is None:
        return True, "first model: there is no champion yet"
    champ = summary_from_report(champion)
    if cand.items_digest and champ.items_digest and cand.items_digest != champ.items_digest:
        return False, (f"not comparable: evaluated on different items ({cand.items_digest} vs "
                       f"{champ.items_digest}); evaluate both on the same suite")
    d_acc = cand.accuracy - champ.accuracy
    acc = f"accuracy {cand.accuracy:.4f} vs {champ.accuracy:.4f} ({d_acc:+.4f})"
    tok_change = (cand.mean_tokens - champ.mean_tokens) / champ.mean_tokens if champ.mean_tokens else 0.0
    tok = f"mean tokens {cand.mean_tokens:.1f} vs {champ.mean_tokens:.1f} ({tok_change:+.1%})"
    if d_acc > m.acc_margin:
        if cand.mean_tokens <= champ.mean_tokens:
            return True, f"higher {acc} at no more tokens: {tok}"
        return False, f"higher {acc} but more tokens: {tok}"
    if abs(d_acc) <= m.acc_margin:
        if cand.mean_tokens <= champ.mean_tokens * (1 - m.tok_margin):
            return True, f"equal {acc} (within {m.acc_margin}) with fewer tokens: {tok}"
        return False, f"equal {acc} (within {m.acc_margin}) but not {m.tok_margin:.0%} fewer tokens: {tok}"
    return False, f"lower {acc} (beyond the {m.acc_margin} margin); {tok}"

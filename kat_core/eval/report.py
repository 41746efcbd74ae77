"""The evaluation report: report.json (a stable, documented schema), report.md, and the comparison of two.

report.json, schema "kat-eval-report/2":

    {
      "schema": "kat-eval-report/2",
      "model": "<model dir>", "created_at": "<UTC ISO time>", "code_version": "<git sha>", "seconds": 12.3,
      "settings": {"suites", "modes", "limit", "n_samples", "temperature", "top_p", "max_new_tokens", "seed",
                   "criterion": {"token_cost", "token_budget", "delta", "decoding", "min_cell"}, "max_len",
                   "draft_tokens"},                      # > 0: decoded speculatively (kat_core.speculative)
      "speculative": {"<suite>": {"<segment>": {"proposed", "accepted", "rate"}}},  # only when draft_tokens > 0
      "items": ["<item id>", ...],            # every evaluated item, sorted (ids carry their suite's prefix)
      "items_digest": "<16 hex>",             # registry.items_digest(items): equal digests = same items
      "overall": {"<mode>": BLOCK, ...},      # all suites' items together; modes: auto | on | off
      "mode_selection": SELECTION | null,     # all suites' items together
      "suites": {
        "<suite>": {
          "n": 100, "skipped_too_long": 0,
          "modes": {"<mode>": BLOCK},
          "levels": {"<difficulty level>": {"<mode>": BLOCK}},
          "mode_selection": SELECTION | null,
          "level_selection": {"<difficulty level>": SELECTION | null}
        }
      }
    }

    BLOCK = {"n": items,
             "accuracy": {"greedy": 0..1, "pass@1": 0..1 | null},
             "mean_tokens": {"total", "judge", "think", "answer"},   # greedy responses, forced prefix included
             "think_on_rate", "well_formed_rate", "truncated_rate"}  # shares of greedy responses (null when n=0)
    SELECTION = {"n", "criterion", "delta", "choice": ORACLE,
                 # auto's verdict words the model wrote: how many it drew at raw probability < weak_below
                 "decisions": {"n", "weak", "weak_below", "min_p"},
                 # the hindsight (per-item) oracle under the original keys
                 "oracle": ORACLE, "agreement", "regret": {"accuracy", "tokens", "value"},
                 "confusion": {"oracle_off"|"oracle_on": {"chose_off", "chose_on", "chose_none"}},
                 "feature_cell": {"oracle": ORACLE, "agreement", "regret", "cells",
                                  "by_cell": {cell: {"n", "oracle", "mean_preference_off", "error", "decided_by",
                                                     "preference_off", "decided_on_n", "auto_think_on_rate",
                                                     "auto_none_rate"}},
                                  "decided_on": {"source": "split" | "calibration", "items"},
                                  "in_split": {"oracle": ORACLE, "agreement", "regret"},  # only when calibrated
                                  "sign_rule": {"oracle": ORACLE, "agreement", "regret"}}}      (see metrics.py)
    ORACLE = {"accuracy", "mean_tokens", "think_on_rate", "value"}

The promotion gate (`platform.registry.summary_from_report`) reads `overall.auto.accuracy.greedy`,
`overall.auto.mean_tokens.total`, `overall.auto.n` and `items_digest`. Additions keep the schema name;
a change of meaning bumps it. /2: the feature-cell oracle decides each cell by the criterion's cell rule
(mean preference + `tie_z` standard errors; a cell under `min_cell` items takes its level's;
kat_core.autothink.CellTally); /1's sign of the
cell's summed preference is `feature_cell.sign_rule`. With `settings.oracle_items` > 0 the cells are decided on
that many other test items measured in both forced modes (`feature_cell.decided_on`); the oracle decided on the
split's own items is then `feature_cell.in_split` (by_cell's `n` counts the split's items, `decided_on_n` the
deciding ones).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from kat_core.eval.metrics import ItemResult, by_level, mode_metrics, mode_selection

SCHEMA = "kat-eval-report/2"
COMPARE_SCHEMA = "kat-eval-compare/1"
FRONTIER_PNG, LEVELS_PNG, COMPARE_PNG = "frontier.png", "think_on_by_level.png", "compare.png"


def build_report(results: dict[str, list[ItemResult]], skipped: dict[str, int], settings: dict[str, Any], *,
                 model: str, seconds: float, calibration: dict[str, list[ItemResult]] | None = None) -> dict[str, Any]:
    """The report (schema above). `calibration`: per suite, other items measured in both forced modes, on which
    the feature-cell oracle decides its cells (metrics.mode_selection)."""
    from kat_core.manifest import code_version
    from kat_core.platform.registry import items_digest

    modes = settings["modes"]
    from kat_core.config import AutoThinkConfig

    crit = AutoThinkConfig(**settings["criterion"]) if settings.get("criterion") else \
        AutoThinkConfig(delta=settings.get("oracle_delta", AutoThinkConfig().delta))
    everything = [r for rs in results.values() for r in rs]
    items = sorted(r.id for r in everything)
    calibration = calibration or {}
    all_calibration = [r for rs in calibration.values() for r in rs]
    suites = {
        name: {
            "n": len(rs),
            "skipped_too_long": skipped.get(name, 0),
            "modes": {m: mode_metrics(rs, m) for m in modes},
            "levels": by_level(rs, modes),
            "mode_selection": mode_selection(rs, crit, calibration.get(name)),
            "level_selection": {lvl: mode_selection([r for r in rs if str(r.level) == lvl], crit,
                                                    [r for r in calibration.get(name, []) if str(r.level) == lvl])
                                for lvl in by_level(rs, ())},
        }
        for name, rs in results.items()
    }
    return {
        "schema": SCHEMA,
        "model": model,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "seconds": round(seconds, 2),
        "settings": settings,
        "items": items,
        "items_digest": items_digest(items),
        "overall": {m: mode_metrics(everything, m) for m in modes},
        "mode_selection": mode_selection(everything, crit, all_calibration),
        "suites": suites,
    }


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(directory: Path, report: dict[str, Any], results: dict[str, list[ItemResult]],
                 inputs: dict[str, Path] | None = None) -> None:
    """report.json, report.md, items.jsonl (every item's scored responses), the plots and manifest.json."""
    from kat_core.eval import plots
    from kat_core.eval.evaluate import ITEMS_JSONL, REPORT_JSON, REPORT_MD
    from kat_core.manifest import write_manifest

    directory = Path(directory)
    (directory / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    with open(directory / ITEMS_JSONL, "w") as f:
        for rs in results.values():
            for r in rs:
                f.write(json.dumps(r.to_dict()) + "\n")
    plots.frontier(report, directory / FRONTIER_PNG)
    plots.think_on_by_level(report, directory / LEVELS_PNG)
    (directory / REPORT_MD).write_text(render_markdown(report))
    write_manifest(directory, stage="evaluate", inputs=inputs,
                   extra={"items_digest": report["items_digest"], "settings": report["settings"]})


# --- Markdown ------------------------------------------------------------------------------------------------

def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _mode_table(blocks: dict[str, dict[str, Any]], first: str = "mode") -> list[str]:
    lines = [f"| {first} | n | accuracy | pass@1 | tokens | judge | think | answer | think-on | well-formed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, b in blocks.items():
        t = b["mean_tokens"]
        lines.append(f"| {key} | {b['n']} | {_f(b['accuracy']['greedy'])} | {_f(b['accuracy']['pass@1'])} | "
                     f"{_f(t['total'], 1)} | {_f(t['judge'], 1)} | {_f(t['think'], 1)} | {_f(t['answer'], 1)} | "
                     f"{_f(b['think_on_rate'])} | {_f(b['well_formed_rate'])} |")
    return lines


def _selection_lines(sel: dict[str, Any] | None) -> list[str]:
    if not sel:
        return ["Mode selection: needs the auto, on and off modes."]
    c, ch, crit = sel["confusion"], sel["choice"], sel.get("criterion", {"delta": sel["delta"]})
    rule = (f"V = accuracy - {crit.get('token_cost')} x tokens / {crit.get('token_budget')}, think-off when "
            f"V_off >= V_on - {crit['delta']}, {crit.get('decoding', 'greedy')} outcomes")
    rows = [("hindsight (per item)", sel["oracle"], sel["regret"], sel["agreement"])]
    if sel.get("feature_cell"):
        fc = sel["feature_cell"]
        on = fc.get("decided_on", {"source": "split"})
        where = f"decided on {on['items']} other items" if on["source"] == "calibration" else "decided on this split"
        rows.append((f"feature cell ({fc['cells']} cells, {where})", fc["oracle"], fc["regret"], fc["agreement"]))
        if fc.get("in_split"):
            split = fc["in_split"]
            rows.append(("feature cell, decided on this split", split["oracle"], split["regret"], split["agreement"]))
        if fc.get("sign_rule"):
            sign = fc["sign_rule"]
            rows.append(("feature cell, sign of the mean", sign["oracle"], sign["regret"], sign["agreement"]))
    return [
        f"Mode selection over {sel['n']} items ({rule}). Auto's choices are valued by the forced modes' outcomes; "
        "the feature-cell oracle is the frontier a selector that sees only the request can reach (a cell thinks "
        f"when its mean edge exceeds {crit.get('tie_z', 0)} standard errors, else a tie goes to think-off; the "
        "sign of the mean alone also knows which of this split's items a direct answer missed).",
        "",
        "| | accuracy | tokens | think-on | value | auto agrees | regret: accuracy | tokens | value |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| auto's choices | {_f(ch['accuracy'])} | {_f(ch['mean_tokens'], 1)} | {_f(ch.get('think_on_rate'))} | "
        f"{_f(ch.get('value'))} | | | | |",
        *(f"| {name} | {_f(o['accuracy'])} | {_f(o['mean_tokens'], 1)} | {_f(o['think_on_rate'])} | "
          f"{_f(o.get('value'))} | {_f(agree)} | {_f(rg['accuracy'])} | {_f(rg['tokens'], 1)} | "
          f"{_f(rg.get('value'))} |" for name, o, rg, agree in rows),
        "",
        "| hindsight oracle \\ auto chose | off | on | none |",
        "|---|---:|---:|---:|",
        *(f"| {k.removeprefix('oracle_')} | {v['chose_off']} | {v['chose_on']} | {v['chose_none']} |"
          for k, v in c.items()),
        *_decision_lines(sel.get("decisions")),
        *_cell_lines((sel.get("feature_cell") or {}).get("by_cell")),
    ]


def _decision_lines(dec: dict[str, Any] | None) -> list[str]:
    if not dec or not dec["n"]:
        return []
    return ["", f"Auto's verdict word (` think` / ` direct`) was drawn at a raw probability under "
                f"{dec['weak_below']} in {dec['weak']} of {dec['n']} responses (lowest {_f(dec['min_p'])}): "
                "decisions the model barely made; the verdict guard keeps them well formed."]


def _cell_lines(by_cell: dict[str, Any] | None) -> list[str]:
    """Per feature cell: its size, its mean preference and standard error, the oracle's mode (and whether the cell
    or its level decided it), and how often auto thought."""
    if not by_cell:
        return []
    return ["", "| feature cell | items | decided on | mean V_off - V_on + delta | standard error | cell oracle | "
            "auto think-on |",
            "|---|---:|---:|---:|---:|---|---:|",
            *(f"| {cell} | {c['n']} | {c.get('decided_on_n', c['n'])} | "
              f"{c.get('mean_preference_off', c['preference_off']):+.3f} | "
              f"{_f(c.get('error'))} | {c['oracle']}{' (level)' if c.get('decided_by') == 'level' else ''} | "
              f"{_f(c['auto_think_on_rate'])} |" for cell, c in by_cell.items())]


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"# Evaluation of `{report['model']}`",
        "",
        f"{report['created_at']}, code {report['code_version']}, {report['seconds']} s. Suites: "
        f"{', '.join(s['suites'])}; modes: {', '.join(s['modes'])}; greedy accuracy, pass@1 over {s['n_samples']} "
        f"samples at temperature {s['temperature']} (top-p {s['top_p']}); at most {s['max_new_tokens']} new "
        f"tokens; seed {s['seed']}; items digest `{report['items_digest']}`.",
        "",
        "## Overall",
        "",
        *_mode_table(report["overall"]),
        "",
        *_selection_lines(report["mode_selection"]),
        "",
        f"![efficiency frontier]({FRONTIER_PNG})",
        "",
        f"![think-on rate by difficulty]({LEVELS_PNG})",
    ]
    for name, suite in report["suites"].items():
        lines += ["", f"## {name}", "",
                  f"{suite['n']} items" + (f", {suite['skipped_too_long']} skipped (do not fit the context)"
                                           if suite["skipped_too_long"] else "") + ".", ""]
        if not suite["n"]:
            continue
        lines += _mode_table(suite["modes"])
        drafts = report.get("speculative", {}).get(name)
        if drafts:  # decoded speculatively: how often the MTP module's drafts stood, per segment
            lines += ["", f"Speculative decoding ({s.get('draft_tokens')} draft tokens a step), drafts accepted: "
                      + ", ".join(f"{seg} {d['rate']:.2f} of {d['proposed']}" for seg, d in drafts.items()) + "."]
        lines += ["", "By difficulty level:", ""]
        rows = {f"L{lvl} {m}": b for lvl, blocks in suite["levels"].items() for m, b in blocks.items()}
        lines += _mode_table(rows, first="level, mode")
        lines += ["", *_selection_lines(suite["mode_selection"])]
        per_level = {lvl: sel for lvl, sel in suite.get("level_selection", {}).items() if sel}
        if per_level:
            lines += ["", "| level | auto think-on | oracle think-on | agreement | accuracy regret | token regret |",
                      "|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {lvl} | {_f(suite['levels'][lvl]['auto']['think_on_rate'])} | "
                      f"{_f(sel['oracle']['think_on_rate'])} | {_f(sel['agreement'])} | "
                      f"{_f(sel['regret']['accuracy'])} | {_f(sel['regret']['tokens'], 1)} |"
                      for lvl, sel in per_level.items()]
    return "\n".join(lines) + "\n"


# --- two reports side by side ----------------------------------------------------------------------------------

def _view(block: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": block["accuracy"]["greedy"], "pass@1": block["accuracy"]["pass@1"],
            "mean_tokens": block["mean_tokens"]["total"], "think_on_rate": block["think_on_rate"]}


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: None if a[k] is None or b[k] is None else round(b[k] - a[k], 4) for k in a}


def head_to_head(items_a: dict[str, ItemResult], items_b: dict[str, ItemResult], mode: str) -> dict[str, int] | None:
    """Greedy correctness per item in `mode`: how many only A, only B, both or neither got right."""
    shared = [i for i in items_a if i in items_b and mode in items_a[i].greedy and mode in items_b[i].greedy]
    if not shared:
        return None
    out = {"a_only": 0, "b_only": 0, "both": 0, "neither": 0}
    for i in shared:
        a, b = items_a[i].greedy[mode].correct, items_b[i].greedy[mode].correct
        out["both" if a and b else "a_only" if a else "b_only" if b else "neither"] += 1
    right_before = out["both"] + out["a_only"]
    # of what A got right, the share B still gets right: what a fine-tuned B kept of its base A
    out["kept"] = round(out["both"] / right_before, 4) if right_before else None
    return out


def comparison(ra: dict[str, Any], rb: dict[str, Any], items_a: dict[str, ItemResult],
               items_b: dict[str, ItemResult], names: tuple[str, str]) -> dict[str, Any]:
    """A (baseline) vs B per suite and mode, head-to-head counts, and the promotion gate's verdict on B as the
    candidate against A as the champion (default margins, auto mode)."""
    from kat_core.platform.registry import gate

    rows = []
    scopes = [("overall", ra["overall"], rb["overall"])]
    scopes += [(s, ra["suites"][s]["modes"], rb["suites"][s]["modes"]) for s in ra["suites"] if s in rb["suites"]]
    for scope, blocks_a, blocks_b in scopes:
        for mode in blocks_a:
            if mode in blocks_b:
                a, b = _view(blocks_a[mode]), _view(blocks_b[mode])
                rows.append({"suite": scope, "mode": mode, "n": blocks_a[mode]["n"], "a": a, "b": b,
                             "delta": _delta(a, b)})
    levels = []  # per difficulty level: where does each model think, and what does it buy
    for suite in (s for s in ra["suites"] if s in rb["suites"]):
        la, lb = ra["suites"][suite].get("levels", {}), rb["suites"][suite].get("levels", {})
        for lvl in sorted(set(la) & set(lb), key=lambda v: (not str(v).isdigit(), int(v) if str(v).isdigit() else v)):
            for mode in (m for m in la[lvl] if m in lb[lvl]):
                a, b = _view(la[lvl][mode]), _view(lb[lvl][mode])
                levels.append({"suite": suite, "level": lvl, "mode": mode, "n": la[lvl][mode]["n"], "a": a, "b": b,
                               "delta": _delta(a, b)})
    modes = [m for m in ra["overall"] if m in rb["overall"]]
    gate_result = None
    if "auto" in modes:
        passed, reason = gate(rb, ra)
        gate_result = {"passed": passed, "reason": reason}
    return {
        "schema": COMPARE_SCHEMA,
        "a": names[0], "b": names[1],
        "items_digest": ra.get("items_digest"),
        "rows": rows,
        "levels": levels,
        "mode_selection": {"a": ra.get("mode_selection"), "b": rb.get("mode_selection")},
        "head_to_head": {m: head_to_head(items_a, items_b, m) for m in modes},
        "gate": gate_result,
    }


def render_comparison(c: dict[str, Any]) -> str:
    lines = [f"# A: `{c['a']}` vs B: `{c['b']}`", "", f"Same items (digest `{c['items_digest']}`).", "",
             "| suite | mode | n | accuracy A | accuracy B | Δ | tokens A | tokens B | Δ | think-on A | think-on B |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in c["rows"]:
        a, b, d = r["a"], r["b"], r["delta"]
        lines.append(f"| {r['suite']} | {r['mode']} | {r['n']} | {_f(a['accuracy'])} | {_f(b['accuracy'])} | "
                     f"{_f(d['accuracy'], 3)} | {_f(a['mean_tokens'], 1)} | {_f(b['mean_tokens'], 1)} | "
                     f"{_f(d['mean_tokens'], 1)} | {_f(a['think_on_rate'])} | {_f(b['think_on_rate'])} |")
    if c.get("levels"):
        lines += ["", "By difficulty level:", "",
                  "| suite | level | mode | n | accuracy A | accuracy B | tokens A | tokens B | think-on A "
                  "| think-on B |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['suite']} | {r['level']} | {r['mode']} | {r['n']} | {_f(r['a']['accuracy'])} | "
                  f"{_f(r['b']['accuracy'])} | {_f(r['a']['mean_tokens'], 1)} | {_f(r['b']['mean_tokens'], 1)} | "
                  f"{_f(r['a']['think_on_rate'])} | {_f(r['b']['think_on_rate'])} |" for r in c["levels"]]
    h2h = {m: v for m, v in c["head_to_head"].items() if v}
    if h2h:
        lines += ["", "Greedy correctness item by item (kept: of what A got right, the share B gets right too):", "",
                  "| mode | only A | only B | both | neither | kept |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {m} | {v['a_only']} | {v['b_only']} | {v['both']} | {v['neither']} | {_f(v.get('kept'))} |"
                  for m, v in h2h.items()]
    sel = c["mode_selection"]
    if sel["a"] and sel["b"]:
        lines += ["", f"Mode-selection agreement with the oracle: A {_f(sel['a']['agreement'])}, "
                      f"B {_f(sel['b']['agreement'])}; token regret A {_f(sel['a']['regret']['tokens'], 1)}, "
                      f"B {_f(sel['b']['regret']['tokens'], 1)}."]
    if c["gate"]:
        verdict = "passes" if c["gate"]["passed"] else "does not pass"
        lines += ["", f"Promotion gate (B as candidate, A as champion): B {verdict}: {c['gate']['reason']}."]
    lines += ["", f"![A vs B]({COMPARE_PNG})"]
    return "\n".join(lines) + "\n"


def write_comparison(directory: Path, c: dict[str, Any]) -> None:
    """compare.png, compare.md, then compare.json, each written to a temp name and renamed into place."""
    from kat_core.eval import plots

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plots.compare(c, directory / COMPARE_PNG)
    write_text_atomic(directory / "compare.md", render_comparison(c))
    write_text_atomic(directory / "compare.json", json.dumps(c, indent=2) + "\n")

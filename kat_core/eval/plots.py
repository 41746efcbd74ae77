"""The report's figures (matplotlib, Agg: no display needed), each drawn from report.json alone.

- `frontier`: accuracy against mean tokens for auto, on and off (and the oracle): the efficiency frontier.
  Forced on and off are the two ends; a good AutoThink model puts auto near the oracle, up and to the left.
- `think_on_by_level`: auto's think-on rate per difficulty level, per suite (the oracle's dashed beside it).
- `compare`: two models' auto/on/off points with an arrow from A to B.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MODE_STYLE = {"auto": ("tab:green", "*"), "on": ("tab:red", "o"), "off": ("tab:blue", "s")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _point(block: dict[str, Any]) -> tuple[float, float] | None:
    acc, tok = block["accuracy"]["greedy"], block["mean_tokens"]["total"]
    return None if acc is None or tok is None else (tok, acc)


def frontier(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    scopes = [("overall", report["overall"], report["mode_selection"])]
    if len(report["suites"]) > 1:
        scopes += [(s, v["modes"], v["mode_selection"]) for s, v in report["suites"].items()]
    cols = min(len(scopes), 4)
    rows = -(-len(scopes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(scopes):]:
        ax.set_visible(False)
    for ax, (title, blocks, sel) in zip(axes.flat, scopes, strict=False):
        forced = [p for m in ("off", "on") if m in blocks and (p := _point(blocks[m]))]
        if len(forced) == 2:  # the line between the two forced modes: what a fixed mix of them would give
            ax.plot(*zip(*forced, strict=True), color="grey", lw=1, ls=":")
        for mode, block in blocks.items():
            p = _point(block)
            if p:
                color, marker = MODE_STYLE.get(mode, ("black", "x"))
                ax.scatter(*p, color=color, marker=marker, s=120 if mode == "auto" else 60, label=mode, zorder=3)
        if sel and sel["oracle"]["accuracy"] is not None:
            ax.scatter(sel["oracle"]["mean_tokens"], sel["oracle"]["accuracy"], color="black", marker="D",
                       facecolors="none", s=60, zorder=3, label="hindsight oracle")
        if sel and sel.get("feature_cell") and sel["feature_cell"]["oracle"]["accuracy"] is not None:
            cell = sel["feature_cell"]["oracle"]
            ax.scatter(cell["mean_tokens"], cell["accuracy"], color="black", marker="s", facecolors="none", s=60,
                       zorder=3, label="feature-cell oracle")
        ax.set_title(title)
        ax.set_xlabel("mean tokens per response")
        ax.set_ylabel("accuracy (greedy)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        if ax.collections:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no items evaluated", ha="center", transform=ax.transAxes)
    fig.suptitle("Efficiency frontier: auto vs forced modes")
    _save(fig, path)
    plt.close(fig)


def think_on_by_level(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (name, suite) in enumerate(report["suites"].items()):
        levels = [(int(lvl), blocks["auto"]["think_on_rate"]) for lvl, blocks in suite["levels"].items()
                  if "auto" in blocks and blocks["auto"]["think_on_rate"] is not None]
        if levels:
            ax.plot(*zip(*levels, strict=True), marker="o", color=f"C{i}", label=f"{name} auto")
        oracle = [(int(lvl), sel["oracle"]["think_on_rate"]) for lvl, sel in suite.get("level_selection", {}).items()
                  if sel and sel["oracle"]["think_on_rate"] is not None]
        if oracle:  # where thinking actually pays, for reference
            ax.plot(*zip(*oracle, strict=True), ls="--", marker=".", color=f"C{i}", alpha=0.6,
                    label=f"{name} oracle")
    levels_seen = sorted({int(lvl) for suite in report["suites"].values() for lvl in suite["levels"]})
    if levels_seen:
        ax.set_xticks(levels_seen)
    ax.set_xlabel("difficulty level")
    ax.set_ylabel("think-on rate (greedy)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.set_title("When does the model choose to think?")
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no auto-mode results", ha="center", transform=ax.transAxes)
    _save(fig, path)
    plt.close(fig)


def compare(c: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for row in c["rows"]:
        if row["suite"] != "overall":
            continue
        a, b = row["a"], row["b"]
        if None in (a["accuracy"], b["accuracy"], a["mean_tokens"], b["mean_tokens"]):
            continue
        color, marker = MODE_STYLE.get(row["mode"], ("black", "x"))
        ax.scatter(a["mean_tokens"], a["accuracy"], color=color, marker=marker, alpha=0.4, s=60)
        ax.scatter(b["mean_tokens"], b["accuracy"], color=color, marker=marker, s=80, label=f"{row['mode']}")
        ax.annotate("", xy=(b["mean_tokens"], b["accuracy"]), xytext=(a["mean_tokens"], a["accuracy"]),
                    arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.7})
    ax.set_xlabel("mean tokens per response")
    ax.set_ylabel("accuracy (greedy)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.set_title("A (faded) -> B, all suites")
    if ax.collections:
        ax.legend(fontsize=8, loc="best")
    _save(fig, path)
    plt.close(fig)

"""Small SVG charts drawn by the server (no plotting library per request, no JavaScript to draw them):
line charts of training curves and the stage timeline of a run."""

from __future__ import annotations

import math
from html import escape
from typing import Any

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
STATUS_COLORS = {"succeeded": "#2ca02c", "cached": "#7fbf7f", "running": "#1f77b4", "failed": "#d62728",
                 "cancelled": "#999999", "pending": "#cccccc"}


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2g}"
    return f"{v:.3g}"


def line_chart(series: dict[str, list[list[float]]], title: str, *, width: int = 460, height: int = 220,
               y_range: tuple[float, float] | None = None) -> str:
    """An SVG line chart: one polyline per series of [x, y] points, axes with a few ticks, and a legend (each
    series with its last value) in rows under the title."""
    series = {k: [p for p in v if all(math.isfinite(c) for c in p)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    left, right, bottom = 52, 12, 34
    legend, lx, row = [], float(left), 0
    for name, points in series.items():
        label = f"{name} {_fmt(points[-1][1])}"
        span = 22 + 6.2 * len(label)  # about 6.2 px per character at this size
        if legend and lx + span > width - right:
            lx, row = float(left), row + 1
        legend.append((lx, row, label))
        lx += span
    top = 24 + 14 * (row + 1) if series else 26
    height += 14 * row
    w, h = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="15" class="chart-title">{escape(title)}</text>']
    if not series:
        parts.append(f'<text x="{left + w / 2}" y="{top + h / 2}" text-anchor="middle" class="chart-empty">no data'
                     '</text></svg>')
        return "".join(parts)
    xs = [p[0] for v in series.values() for p in v]
    ys = [p[1] for v in series.values() for p in v]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range or (min(ys), max(ys))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return top + h - (y - y0) / (y1 - y0) * h

    parts.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="chart-frame"/>')
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="chart-grid"/>'
                     f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" class="chart-tick">{_fmt(t)}</text>')
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{sx(t):.1f}" y="{top + h + 14}" text-anchor="middle" class="chart-tick">'
                     f'{_fmt(t)}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{height - 4}" text-anchor="middle" class="chart-tick">step</text>')
    for i, ((_name, points), (gx, grow, label)) in enumerate(zip(series.items(), legend, strict=True)):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        if len(points) == 1:
            parts.append(f'<circle cx="{sx(points[0][0]):.1f}" cy="{sy(points[0][1]):.1f}" r="3" fill="{color}"/>')
        ly = 30 + 14 * grow
        parts.append(f'<line x1="{gx:.1f}" x2="{gx + 14:.1f}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
                     f'stroke-width="2"/><text x="{gx + 18:.1f}" y="{ly}" class="chart-legend">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def curve_groups(series: dict[str, list[list[float]]]) -> list[tuple[str, dict[str, list[list[float]]],
                                                                        tuple[float, float] | None]]:
    """A stage's series split into charts: loss terms, reward, think-on rate (0..1)."""
    loss = {k: v for k, v in series.items() if k in ("loss", "ce", "mtp", "kd")}
    reward = {k: v for k, v in series.items() if "reward" in k}
    think = {k: v for k, v in series.items() if "think_on" in k}
    groups: list[tuple[str, dict[str, Any], tuple[float, float] | None]] = []
    if loss:
        groups.append(("loss", loss, None))
    if reward:
        groups.append(("reward", reward, None))
    if think:
        groups.append(("think-on rate", think, (0.0, 1.0)))
    return groups


def timeline(stages: list[dict[str, Any]], *, width: int = 720, row: int = 22) -> str:
    """The stage timeline: one bar per stage, placed one after the other by its duration (stages of the
    pipeline run in sequence), coloured by status; a running stage without a duration gets a stub."""
    if not stages:
        return ""
    left, right = 110, 70
    total = sum(s.get("seconds") or 0 for s in stages) or 1.0
    w = width - left - right
    height = row * len(stages) + 8
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="stage timeline">']
    t = 0.0
    for i, s in enumerate(stages):
        seconds = s.get("seconds") or 0.0
        x = left + t / total * w
        bar = max(seconds / total * w, 4.0)
        y = 4 + i * row
        color = STATUS_COLORS.get(s.get("status", ""), "#999999")
        label = f"{seconds:.1f}s" if s.get("seconds") is not None else s.get("status", "")
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end" class="chart-tick">{escape(s["name"])}'
                     f'</text><rect x="{x:.1f}" y="{y}" width="{bar:.1f}" height="{row - 6}" fill="{color}" rx="2">'
                     f'<title>{escape(s["name"])}: {escape(s.get("status", ""))} {label}</title></rect>'
                     f'<text x="{x + bar + 4:.1f}" y="{y + 14}" class="chart-tick">{escape(label)}</text>')
        t += seconds
    parts.append("</svg>")
    return "".join(parts)

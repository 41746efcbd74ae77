"""`kat data stats`: what is in a dataset, computed from its records (not trusted from the manifest)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from kat_core.data.dataset import REJECTS, iter_jsonl, read_records
from kat_core.manifest import read_manifest


def _countable(value: Any) -> Any:
    """A field's value as a counter key: a list or object (a malformed record; `kat data validate` names it) as
    its JSON text, which a Counter can hold, rather than a TypeError."""
    import json

    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def dataset_stats(dataset_dir: str | Path) -> dict[str, Any]:
    dataset_dir = Path(dataset_dir)
    records = read_records(dataset_dir)
    level_mode: dict[int, Counter] = defaultdict(Counter)
    lengths: dict[str, list[int]] = defaultdict(list)
    records = [{k: _countable(v) for k, v in r.items()} for r in records]
    for r in records:
        level_mode[r.get("difficulty")][r.get("mode")] += 1
        lengths[r.get("mode")].append(len(str(r.get("completion") or "")))
    rejects_path = dataset_dir / REJECTS
    rejects = Counter(r.get("reason") for r in iter_jsonl(rejects_path)) if rejects_path.is_file() else Counter()
    manifest = read_manifest(dataset_dir) or {}
    return {
        "dataset": str(dataset_dir),
        "records": len(records),
        "families": dict(Counter(r.get("family") for r in records)),
        "modes": dict(Counter(r.get("mode") for r in records)),
        "regimes": dict(Counter(r.get("regime") for r in records)),
        "level_mode": {lvl: dict(c) for lvl, c in sorted(level_mode.items(), key=lambda kv: str(kv[0]))},
        "mean_completion_chars": {m: round(mean(v), 1) for m, v in lengths.items()},
        "rejects": dict(rejects),
        "critic": manifest.get("critic"),
        "config_hash": manifest.get("config_hash"),
    }


def render_stats(stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{stats['dataset']}: {stats['records']} records")
    for col in ("level", "think-off", "think-on", "total", "on share"):
        table.add_column(col, justify="right")
    for level, counts in stats["level_mode"].items():
        off, on = counts.get("off", 0), counts.get("on", 0)
        table.add_row(str(level), str(off), str(on), str(off + on), f"{on / max(off + on, 1):.0%}")
    off, on = stats["modes"].get("off", 0), stats["modes"].get("on", 0)
    table.add_row("all", str(off), str(on), str(off + on), f"{on / max(off + on, 1):.0%}", style="bold")
    console.print(table)
    console.print(f"families {stats['families']}  regimes {stats['regimes']}")
    console.print(f"mean completion chars {stats['mean_completion_chars']}")
    critic = stats.get("critic") or {}
    console.print(f"rejects {stats['rejects'] or 'none'}  critic catch rate {critic.get('catch_rate')}")

"""What the `kat` command prints as tables and summaries: plain text from the service's records (the
commands in kat_app.cli only fetch and echo)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kat_core.platform.tracking import resolve_tracking_uri

if TYPE_CHECKING:
    from kat_core.platform.registry import AliasEvent


def stage_line(kind: str, stage: Any) -> str:
    """One line of a run's progress: a stage started ("start"), trained some steps ("progress") or ended."""
    if kind == "start":
        return f"  {stage.name:<18} running ..."
    if kind == "progress":
        return f"  {stage.name:<18} {stage.progress}"
    if stage.status == "failed":
        return f"  {stage.name:<18} FAILED after {stage.seconds:.1f}s: {stage.error}"
    where = ", ".join(stage.outputs.values())
    return f"  {stage.name:<18} {stage.status} in {stage.seconds:.1f}s -> {where}"


def run_summary(info: Any) -> str:
    """A run: status, times, error, one line per stage, the total and where its log is."""
    lines = [f"run {info.run_id} ({info.backend}, profile {info.profile}"
             f"{', ' + ' '.join(info.overrides) if info.overrides else ''}): {info.status}",
             f"  started {info.created_at}, finished {info.finished_at or '-'}"]
    if info.error:
        lines.append(f"  error: {info.error}")
    for s in info.stages:
        seconds = f"{s.seconds:.1f}s" if s.seconds is not None else "-"
        outputs = ", ".join(f"{k}={v}" for k, v in s.outputs.items())
        lines.append(f"  {s.name:<18} {s.status:<10} {seconds:>8}  {outputs}")
    if info.stages:
        lines.append(f"  {'total':<18} {'':<10} {sum(s.seconds or 0 for s in info.stages):>7.1f}s")
    if info.log:
        lines.append(f"  log {info.log}")
    return "\n".join(lines)


def model_summary(outputs: dict[str, dict[str, str]]) -> str:
    """The evaluation (auto vs forced think-on/off) and the registry outcome of a finished run."""
    lines = []
    report_dir = outputs.get("evaluate", {}).get("report")
    if report_dir and (Path(report_dir) / "report.json").is_file():
        overall = json.loads((Path(report_dir) / "report.json").read_text()).get("overall", {})
        lines.append(f"evaluation ({report_dir}/report.md):")
        lines.append(f"  {'mode':5s} {'accuracy':>9s} {'tokens':>7s} {'think-on':>9s}")
        nan = float("nan")
        for mode, block in overall.items():
            acc = (block.get("accuracy") or {}).get("greedy")
            tokens = (block.get("mean_tokens") or {}).get("total")
            think_on = block.get("think_on_rate")
            lines.append(f"  {mode:5s} {nan if acc is None else acc:9.3f} {nan if tokens is None else tokens:7.1f} "
                         f"{nan if think_on is None else think_on:9.3f}")
    registered = outputs.get("register", {}).get("registered")
    if registered and Path(registered).is_file():
        r = json.loads(Path(registered).read_text())
        alias = "champion" if r.get("champion") else "candidate"
        lines.append(f"registered model {r['name']} version {r['version']} as {alias} ({r['gate']})")
    lines.append(f"MLflow: {resolve_tracking_uri()}  (mlflow ui --backend-store-uri {resolve_tracking_uri()})")
    return "\n".join(lines)




def run_row(r: dict[str, Any]) -> str:
    stages = " ".join(f"{s['name']}:{s['status']}" for s in r["stages"])
    status = "queued" if r["queued"] else r["status"]
    return f"{r['run_id']}  {status:<10} {r['profile'] or '-':<8} {r['created_at'] or '-'}  {stages}"


def schedule_row(s: dict[str, Any]) -> str:
    extra = " ".join(s["overrides"])
    return (f"{s['schedule_id']}  {s['cron']:<15} {s['profile'] or '-':<8} "
            f"{'paused' if s['paused'] else 'enabled'}  {s.get('next_fire') or '-'}  {s['name'] or ''} "
            f"{extra}").rstrip()


def models_table(models: list[dict[str, Any]]) -> str:
    lines = [f"{'name':20s} {'versions':>8s} {'latest':>6s}  aliases"]
    for m in models:
        aliases = ", ".join(f"{a}=v{v}" for a, v in m["aliases"].items()) or "-"
        lines.append(f"{m['name']:20s} {m['versions']:>8d} {'v' + str(m['latest']):>6s}  {aliases}")
    return "\n".join(lines)


def version_details(info: dict[str, Any]) -> str:
    """A registered version's lineage, one fact a line."""
    ev = info["evaluation"] or {}
    lines = [
        f"{info['name']} v{info['version']}  aliases: {', '.join(info['aliases']) or '-'}  created {info['created']}",
        f"  pipeline run (MLflow): {info['pipeline_run_id'] or '-'}",
        f"  KFP run:               {info['kfp_run_id'] or '-'}",
        f"  profile:               {info['profile'] or '-'}",
        f"  config hash:           {info['config_hash'] or '-'}",
        f"  code version:          {info['code_version'] or '-'}",
        f"  checkpoint digest:     {info['checkpoint_digest'] or '-'}",
        f"  model source:          {info['source']}",
    ]
    if "local_path" in info:
        lines.append(f"  checkpoint (local):    {info['local_path']}" if info["local_path"] else
                     f"  checkpoint (local):    - (on a remote store; `kat serve-model {info['name']}/"
                     f"{info['version']}` downloads it)")
    if ev:
        lines.append(f"  evaluation ({ev.get('mode')}): accuracy {ev.get('accuracy'):.4f}, "
                     f"mean tokens {ev.get('mean_tokens'):.1f}, n {ev.get('n')}, items {ev.get('items_digest')}")
    for title, digests in (("data", info["data"]), ("inputs", info["inputs"])):
        for key, digest in digests.items():
            lines.append(f"  {title} {key}: {digest}")
    return "\n".join(lines)


def history_row(e: AliasEvent) -> str:
    before = f"v{e.previous}" if e.previous is not None else "-"
    return f"{e.at}  {e.alias:9s} {before:>4s} -> v{e.version:<4d} {e.action:8s} {e.who}: {e.reason}"

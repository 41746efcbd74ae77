"""Runs: list, show, submit (the one route every caller takes: `kat run`, `kat pipeline submit`, the
dashboard and schedules), cancel, and what a run left behind (log, curves, files, report, lineage)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kat_app.jobs import DONE, QUEUED
from kat_app.security import redact_config, redact_overrides, redact_text
from kat_app.service.base import ServiceBase, _iso_to_epoch
from kat_core.config import load_config
from kat_core.errors import Conflict, Invalid, KatError, NotFound
from kat_core.manifest import read_manifest
from kat_core.platform.tracking import EXPERIMENT, find_pipeline_run, get_client, pipeline_lineage
from pipelines.backends import BACKENDS
from pipelines.local import Event, LocalBackend
from pipelines.records import RunInfo

PLOTTED = ("loss", "ce", "mtp", "kd")  # loss curves; reward* and think_on* keys are plotted too
LOG_MARK = "==> kat: task "


class RunsService(ServiceBase):
    def _view(self, info, job: dict[str, Any] | None = None) -> dict[str, Any]:
        data = info.to_dict()
        data.pop("pid", None)
        data["overrides"] = redact_overrides(data["overrides"])
        if data.get("error"):
            data["error"] = redact_text(data["error"])
        for stage in data["stages"]:  # the run's error repeats its failed stage's: the same secrets in it
            if stage.get("error"):
                stage["error"] = redact_text(stage["error"])
        start = _iso_to_epoch(info.started_at or info.created_at)
        end = _iso_to_epoch(info.finished_at) or (time.time() if info.status == "running" else None)
        data["duration_s"] = round(end - start, 1) if start and end and info.status != "pending" else None
        data["schedule_id"] = job.get("schedule_id") if job else None
        data["submitted_by"] = job.get("who") if job else None
        data["queued"] = bool(job and job["state"] == QUEUED)
        data["active"] = info.status in ("pending", "running")
        data["_submitted"] = job["submitted_at"] if job else 0.0  # orders runs started within one second
        return data

    def list_runs(self, backend: str | None = None, limit: int = 100) -> dict[str, Any]:
        """{"runs": newest first, each with its stages and duration, "warnings": back ends that failed}."""
        if backend not in (None, *BACKENDS):
            raise Invalid(f"unknown back end {backend!r}; known: {', '.join(BACKENDS)}")
        if not 1 <= int(limit) <= 1000:
            raise Invalid(f"limit must be between 1 and 1000, got {limit}")
        runs, warnings = [], []
        if backend in (None, "local"):
            jobs = self.queue.all()
            runs += [self._view(info, jobs.get(info.run_id)) for info in self.local.list_runs(limit)]
        if backend == "kubeflow" or (backend is None and self.kfp_host):
            try:
                remote = self._kubeflow().list_runs(limit)
                jobs = self.queue.all()
                runs += [self._view(info, jobs.get(info.run_id)) for info in remote]
            except KatError as e:
                if backend == "kubeflow":  # asked for explicitly: its error is the answer
                    raise
                warnings.append(f"kubeflow: {e}")
        runs.sort(key=lambda r: (r.get("created_at") or "", r["_submitted"]), reverse=True)
        for r in runs:
            del r["_submitted"]
        return {"runs": runs[:limit], "warnings": warnings}

    def _info(self, run_id: str, backend: str | None = None):
        return self.backend(self._backend_of(run_id, backend)).status(run_id)

    def get_run(self, run_id: str, backend: str | None = None) -> dict[str, Any]:
        view = self._view(self._info(run_id, backend), self.queue.get(run_id))
        del view["_submitted"]
        if view["queued"]:
            view["queue_position"] = self.queue.position(run_id)
        return view

    def submit_run(self, profile: str, overrides: list[str] | str | None = None, backend: str = "local", *,
                   name: str | None = None, who: str | None = None, schedule_id: str | None = None,
                   cluster: bool | None = None, profile_files: bool = False) -> dict[str, Any]:
        """Check the config, then: local, record the run and queue it for the run worker; kubeflow, submit it
        to KFP (`cluster`: its kfp-kubernetes settings, default when the profile is cluster). Returns the run.
        Nothing is recorded for a config that does not load."""
        if backend not in BACKENDS:
            raise Invalid(f"unknown back end {backend!r}; choose local or kubeflow")
        name = (name or "").strip() or None
        if name and (len(name) > 100 or any(ord(c) < 32 for c in name)):
            raise Invalid("the run name must be at most 100 printable characters")
        checked = self.check_config(profile, overrides, profile_files=profile_files)
        overrides = checked["overrides"]
        if backend == "local":
            run_id = self.local.prepare(profile, overrides, name=name)
            self.queue.add(run_id, "local", schedule_id=schedule_id, who=who)
            if self.worker is not None:
                self.worker.wake()
        else:
            run_id = self.backend("kubeflow", cluster=cluster).submit(profile, overrides, name=name)
            self.queue.add(run_id, "kubeflow", state=DONE, schedule_id=schedule_id, who=who)
        return self.get_run(run_id)

    def run_here(self, profile: str, overrides: list[str] | None = None, *, name: str | None = None,
                 out: str | Path | None = None, on_event: Event | None = None,
                 on_prepared: Callable[[RunInfo], None] | None = None) -> RunInfo:
        """A local run in this process, to its end (`kat run`, `kat pipeline submit --backend local`):
        `on_prepared` sees the run's record before it starts (its id and log), `on_event` each stage's start,
        training progress and end, `out` gets links to the outputs. A failed run is returned (its record says where it
        failed), not raised; a config that does not load is."""
        local = LocalBackend(home=self.home, on_event=on_event, schedules=self.local.schedules)
        run_id = local.prepare(profile, list(overrides or []), name=name)
        if on_prepared:
            on_prepared(local.status(run_id))
        local.execute(run_id, out=out)
        return local.status(run_id)

    def cancel_run(self, run_id: str, backend: str | None = None) -> dict[str, Any]:
        """Stop a run: a queued one never starts; a running local one gets SIGTERM (its process group)."""
        backend = self._backend_of(run_id, backend)
        info = self._info(run_id, backend)
        if info.status not in ("pending", "running"):
            raise Conflict(f"run {run_id} is {info.status}; only a queued or running run can be cancelled")
        if backend == "kubeflow":
            self._kubeflow().cancel(run_id)
            return self.get_run(run_id, backend)
        job = self.queue.get(run_id)
        if job and job["state"] == QUEUED and self.queue.cancel_queued(run_id):
            self.local.cancel(run_id)
            return self.get_run(run_id)
        if info.status == "pending" and job and job.get("pid"):  # started, not yet recorded its own pid
            try:
                os.killpg(job["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.local.cancel(run_id)
        self.queue.finish(run_id, "cancelled")
        return self.get_run(run_id)

    def _stage(self, info, stage: str):
        for s in info.stages:
            if s.name == stage:
                return s
        raise NotFound(f"run {info.run_id} has no stage {stage!r} (stages: "
                       f"{', '.join(s.name for s in info.stages) or 'none yet'})")

    def run_stages(self, run_id: str) -> list[dict[str, Any]]:
        return self.get_run(run_id)["stages"]

    def run_log(self, run_id: str, stage: str | None = None, lines: int = 200) -> dict[str, Any]:
        """The tail of a stage's part of the run log (default: the running stage, else the last one),
        secrets masked. Only the run's own log file is ever read."""
        if not 1 <= int(lines) <= 5000:
            raise Invalid(f"lines must be between 1 and 5000, got {lines}")
        info = self._info(run_id)
        if info.backend != "local":
            return {"stage": stage, "lines": [], "note": "logs of Kubeflow runs are in the Kubeflow Pipelines UI"}
        if stage is not None:
            self._stage(info, stage)
        run_dir = (self.home / "runs" / run_id).resolve()
        text = ""
        path = run_dir / "pipeline.log"
        if path.is_file():
            text = path.read_text(errors="replace")
        chosen = stage or next((s.name for s in info.stages if s.status == "running"), None) or \
            (info.stages[-1].name if info.stages else None)
        if chosen and f"{LOG_MARK}{chosen}\n" in text:
            text = text.rsplit(f"{LOG_MARK}{chosen}\n", 1)[1].split(f"\n{LOG_MARK}", 1)[0]
        elif not text.strip() and (run_dir / "worker.log").is_file():
            text = (run_dir / "worker.log").read_text(errors="replace")
        tail = text.splitlines()[-int(lines):]
        return {"stage": chosen, "lines": [redact_text(line) for line in tail]}

    def _metrics_file(self, info, stage) -> Path | None:
        for uri in stage.outputs.values():
            path = Path(uri) / "metrics.jsonl"
            if path.is_file():
                return path
        if stage.status == "running":  # the live curve: the stage's resumable work folder
            started = _iso_to_epoch(info.started_at or info.created_at) or 0
            found = [p for p in (self.home / "checkpoints").glob(f"{stage.name}-*/output/metrics.jsonl")
                     if p.stat().st_mtime >= started]
            return max(found, key=lambda p: p.stat().st_mtime) if found else None
        return None

    def run_metrics(self, run_id: str, max_points: int = 400) -> dict[str, dict[str, list[list[float]]]]:
        """Training curves per stage: loss terms, reward and think-on rate series as [step, value] pairs
        (thinned to at most `max_points` per series), from each training stage's metrics.jsonl."""
        info = self._info(run_id)
        out: dict[str, dict[str, list[list[float]]]] = {}
        if info.backend != "local":
            return out
        for stage in info.stages:
            path = self._metrics_file(info, stage)
            if path is None:
                continue
            series: dict[str, list[list[float]]] = {}
            for i, line in enumerate(path.read_text(errors="replace").splitlines()):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                step = row.get("step", i)
                for key, value in row.items():
                    if not isinstance(value, int | float) or isinstance(value, bool) or key == "step":
                        continue
                    if key in PLOTTED or "reward" in key or "think_on" in key:
                        series.setdefault(key, []).append([step, value])
            for key, points in series.items():
                if len(points) > max_points:
                    stride = -(-len(points) // max_points)
                    series[key] = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
            if series:
                out[stage.name] = series
        return out

    def run_file(self, run_id: str, stage: str, output: str, relpath: str) -> Path:
        """A file inside one of the run's stage outputs. Anything that would leave that output directory
        (.., absolute paths, links pointing out) is refused as not found."""
        info = self._info(run_id)
        if info.backend != "local":
            raise NotFound("files of Kubeflow runs are in the cluster's object store")
        step = self._stage(info, stage)
        if output not in step.outputs:
            raise NotFound(f"stage {stage} of run {run_id} has no output {output!r}")
        base = Path(step.outputs[output]).resolve()
        if not relpath or "\x00" in relpath or Path(relpath).is_absolute():
            raise NotFound(f"no file {relpath!r} in {stage}/{output} of run {run_id}")
        try:
            target = (base / relpath).resolve()
            found = target.is_relative_to(base) and target.is_file()
        except (OSError, RuntimeError):  # a name too long for the file system (is_file lets that through), a link loop
            found = False
        if not found:
            raise NotFound(f"no file {relpath!r} in {stage}/{output} of run {run_id}")
        return target

    def run_report(self, run_id: str) -> dict[str, Any] | None:
        """The run's evaluation report (report.json) and the names of its plots; None before evaluation."""
        info = self._info(run_id)
        stage = next((s for s in info.stages if s.name == "evaluate" and s.status in ("succeeded", "cached")), None)
        if stage is None or "report" not in stage.outputs:
            return None
        directory = Path(stage.outputs["report"])
        try:
            report = json.loads((directory / "report.json").read_text())
        except (OSError, ValueError):
            return None
        report["plots"] = sorted(p.name for p in directory.glob("*.png"))
        return report

    def run_registration(self, run_id: str) -> dict[str, Any] | None:
        """What the register stage did: the model name, version, whether it became champion and why."""
        info = self._info(run_id)
        stage = next((s for s in info.stages if s.name == "register" and s.status in ("succeeded", "cached")), None)
        if stage is None or "registered" not in stage.outputs:
            return None
        try:
            return json.loads(Path(stage.outputs["registered"]).read_text())
        except (OSError, ValueError):
            return None

    def run_lineage(self, run_id: str) -> dict[str, Any]:
        """Where the run came from: the config (secrets masked), data digests, code version, the MLflow
        parent and stage runs (with links when an MLflow UI is known) and the registered version."""
        info = self._info(run_id)
        out: dict[str, Any] = {"run_id": run_id, "profile": info.profile, "overrides": redact_overrides(info.overrides)}
        try:
            config = load_config(info.profile or "demo", info.overrides)
            out["config"] = redact_config(config.model_dump(mode="json", by_alias=True))
        except KatError as e:
            out["config_error"] = str(e)
        data = {}
        for stage in info.stages:
            for name, uri in stage.outputs.items():
                manifest = read_manifest(Path(uri)) if Path(uri).is_dir() else None
                if manifest:
                    data[f"{stage.name}.{name}"] = {"code_version": manifest.get("code_version"),
                                                   "config_hash": manifest.get("config_hash"),
                                                   "inputs": manifest.get("inputs") or {}}
        out["outputs"] = data
        ui = self.mlflow_ui()
        registered = self.run_registration(run_id)
        cached = self._lineage_cache.get(run_id)
        try:
            if cached is None:
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
                # a register stage that ran in this run names its parent run (a cached one names an older run's)
                fresh = any(s.name == "register" and s.status == "succeeded" for s in info.stages)
                parent = ((registered or {}).get("parent_run") if fresh else None) or \
                    find_pipeline_run(run_id, tracking_uri=self.tracking_uri)
                cached = {}
                if parent:
                    lineage = pipeline_lineage(parent, tracking_uri=self.tracking_uri)
                    exp = self._experiment_id(EXPERIMENT)
                    cached = {
                        "mlflow": {"parent_run_id": parent, "experiment_id": exp,
                                   "url": f"{ui}/#/experiments/{exp}/runs/{parent}" if ui and exp else None,
                                   "stages": [{**s, "url": f"{ui}/#/experiments/{exp}/runs/{s['run_id']}"
                                               if ui and exp else None} for s in lineage["stages"]]},
                        "data": lineage["data"], "code_version": lineage.get("code_version"),
                        "config_hash": lineage.get("config_hash")}
                if info.status in ("succeeded", "failed", "cancelled"):  # a finished run's lineage stays as it is
                    self._lineage_cache[run_id] = cached
            out.update(cached)
        except KatError as e:
            out["mlflow_error"] = redact_text(str(e))  # it names the tracking URI, with any password in it
        out["mlflow_hint"] = None if ui else self.mlflow_hint()
        if registered:
            registered = {k: v for k, v in registered.items() if k != "parent_run"}
            registered["url"] = f"{ui}/#/models/{registered['name']}/versions/{registered['version']}" if ui else None
        out["registered"] = registered
        return out

    def _experiment_id(self, name: str) -> str | None:
        exp = get_client(self.tracking_uri).get_experiment_by_name(name)
        return exp.experiment_id if exp else None


"""The platform's service layer: what the dashboard's pages, its REST API and the `kat` CLI's run, model and
schedule commands all call, so each rule lives once.

    svc = Service()                                   # KAT_HOME, MLflow from MLFLOW_TRACKING_URI, KFP from KFP_HOST
    svc.submit_run("smoke", ["train.steps=10"])       # local: prepared and queued; the run worker executes it
    svc.get_run(run_id); svc.cancel_run(run_id); svc.run_log(run_id); svc.run_report(run_id)
    svc.versions("kat"); svc.compare("kat", 1, 2); svc.promote("kat", 2, reason="...")
    svc.create_schedule("0 3 * * *", "demo", only_if_data_changed=True); svc.trigger_schedule(id)
    svc.datasets()

Runs are reached through the run back ends of `pipelines/` (imported inside the methods: no kfp here),
models through `registry`, schedules through `schedules` (local) or the kubeflow back end (KFP recurring
runs). Errors are KatErrors whose class says what went wrong (`NotFound`, `Invalid`, `Conflict`), so the
web layer can answer 404/422/409 and the CLI prints one line.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kat_core.errors import KatError
from kat_core.platform import kat_home
from kat_core.platform.jobs import DONE, QUEUED, JobQueue
from kat_core.platform.security import redact_config, redact_overrides, redact_text, secret_name

BACKENDS = ("local", "kubeflow")
RUN_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")
PLOTTED = ("loss", "ce", "mtp", "kd")  # loss curves; reward* and think_on* keys are plotted too
LOG_MARK = "==> kat: task "


class NotFound(KatError):
    """Something named in the request does not exist (404)."""


class Invalid(KatError):
    """The request's values cannot be used; the message says which and why (422)."""


class Conflict(KatError):
    """The request is valid but the state does not allow it now (409)."""


def _iso_to_epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _yaml_text(value: Any) -> str:
    """A config value the way `--set key=VALUE` takes it back (YAML flow style, one line)."""
    import yaml

    if isinstance(value, str) and value:
        try:
            if yaml.safe_load(value) == value:  # a plain string that reads back as itself
                return value
        except yaml.YAMLError:
            pass
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def clean_overrides(overrides: list[str] | str | None) -> list[str]:
    """Overrides from a list or from text (one `key=value` per line); blank lines dropped, each checked."""
    if overrides is None:
        return []
    items = overrides.splitlines() if isinstance(overrides, str) else list(overrides)
    out = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise Invalid(f"override {item!r} is not key=value (e.g. train.steps=10)")
        out.append(item)
    return out


class Service:
    def __init__(self, home: str | Path | None = None, *, tracking_uri: str | None = None,
                 kfp_host: str | None = None, mlflow_ui: str | None = None):
        if home is not None:
            self.home = Path(home).resolve()
            self.home.mkdir(parents=True, exist_ok=True)
        else:
            self.home = kat_home()
        self._tracking_uri = tracking_uri
        self.kfp_host = kfp_host or os.environ.get("KFP_HOST") or os.environ.get("KF_PIPELINES_ENDPOINT")
        self._mlflow_ui = mlflow_ui or os.environ.get("KAT_MLFLOW_UI")
        self._queue: JobQueue | None = None
        self.worker = None  # set by the process that runs the run worker (kat serve), to wake it on submit
        self._report_cache: dict[str, dict[str, Any] | None] = {}
        self._lineage_cache: dict[str, dict[str, Any]] = {}  # MLflow lineage of finished runs (it cannot change)

    # ---- plumbing ------------------------------------------------------------------------------------------

    @property
    def queue(self) -> JobQueue:
        if self._queue is None:
            self._queue = JobQueue(self.home)
        return self._queue

    @property
    def tracking_uri(self) -> str:
        """As the pipeline's stages resolve it: MLFLOW_TRACKING_URI, else the SQLite file in KAT_HOME."""
        return self._tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def local(self):
        from pipelines.backends import LocalBackend

        return LocalBackend(home=self.home)

    def _kubeflow(self):
        from pipelines.backends import KubeflowBackend

        return KubeflowBackend(host=self.kfp_host)

    def backends(self) -> dict[str, str | None]:
        """Each back end and why it cannot be used (None: usable)."""
        return {"local": None,
                "kubeflow": None if self.kfp_host else "not configured (set KFP_HOST, and KFP_TOKEN or KFP_COOKIE)"}

    def mlflow_ui(self) -> str | None:
        """Where MLflow's own UI is, for links: KAT_MLFLOW_UI, else a tracking server's own address."""
        if self._mlflow_ui:
            return self._mlflow_ui.rstrip("/")
        uri = self.tracking_uri
        return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None

    def mlflow_hint(self) -> str:
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"

    # ---- config and profiles -------------------------------------------------------------------------------

    def profiles(self) -> list[str]:
        from kat_core.config import available_profiles

        return available_profiles()

    def check_config(self, profile: str, overrides: list[str] | str | None = None) -> dict[str, Any]:
        """The config a run would use, or Invalid naming the bad key; returns its hash and profile."""
        from kat_core.config import load_config
        from kat_core.manifest import config_hash

        overrides = clean_overrides(overrides)
        if profile not in self.profiles():
            raise Invalid(f"unknown profile {profile!r}; choose one of: {', '.join(self.profiles())}")
        try:
            config = load_config(profile, overrides)
        except KatError as e:
            raise Invalid(str(e)) from None
        return {"profile": profile, "overrides": overrides, "config_hash": config_hash(config)}

    def config_fields(self, profile: str) -> list[dict[str, Any]]:
        """Every setting of `profile` for a form: dotted key, section, the profile's value as `--set` text,
        its kind (bool, int, float, choice, text) and choices, description, and whether it is a secret."""
        import typing

        from pydantic import BaseModel

        from kat_core.config import KatConfig, load_config

        if profile not in self.profiles():
            raise NotFound(f"unknown profile {profile!r}; choose one of: {', '.join(self.profiles())}")
        data = load_config(profile).model_dump(mode="json", by_alias=True)
        fields: list[dict[str, Any]] = []

        def walk(model: type[BaseModel], values: dict[str, Any], prefix: str, section: str) -> None:
            for name, info in model.model_fields.items():
                key = info.alias or name
                if not prefix and key == "profile":
                    continue
                ann, value = info.annotation, values.get(key)
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    walk(ann, value or {}, f"{prefix}{key}.", section or key)
                    continue
                args = typing.get_args(ann)
                literal = typing.get_origin(ann) is typing.Literal
                kind = ("choice" if literal else "bool" if ann is bool else "int" if ann is int
                        else "float" if ann is float else "text")
                fields.append({
                    "key": f"{prefix}{key}", "section": section or "general", "value": _yaml_text(value),
                    "kind": kind, "choices": [_yaml_text(a) for a in args] if literal else None,
                    "description": info.description or "", "secret": secret_name(key),
                })

        walk(KatConfig, data, "", "")
        for f in fields:
            if f["secret"]:
                f["value"] = "" if f["value"] in ("null", "") else "***"
        return fields

    def overrides_from_form(self, profile: str, values: dict[str, str], extra: str = "") -> list[str]:
        """The `key=value` overrides a form submits: each field whose text differs from the profile's, then
        the free-form extra lines (which win, being last)."""
        out = []
        for f in self.config_fields(profile):
            given = values.get(f["key"])
            if given is None:
                continue
            given = given.strip()
            if f["secret"] and given in ("", "***"):
                continue
            if given != f["value"]:
                out.append(f"{f['key']}={given}")
        return out + clean_overrides(extra)

    # ---- runs ----------------------------------------------------------------------------------------------

    def _backend_of(self, run_id: str, backend: str | None = None) -> str:
        """The back end a run id belongs to: as given, else local ids start with `local-`."""
        if not RUN_ID.match(run_id or ""):
            raise NotFound(f"unknown run id {run_id!r}")
        if backend is not None:
            if backend not in BACKENDS:
                raise Invalid(f"unknown back end {backend!r}; known: {', '.join(BACKENDS)}")
            return backend
        return "local" if run_id.startswith("local-") else "kubeflow"

    def _view(self, info, job: dict[str, Any] | None = None) -> dict[str, Any]:
        data = info.to_dict()
        data.pop("pid", None)
        data["overrides"] = redact_overrides(data["overrides"])
        if data.get("error"):
            data["error"] = redact_text(data["error"])
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
        backend = self._backend_of(run_id, backend)
        try:
            return self.local.status(run_id) if backend == "local" else self._kubeflow().status(run_id)
        except KatError as e:
            if "unknown run id" in str(e) or "not found" in str(e):
                raise NotFound(str(e)) from None
            raise

    def get_run(self, run_id: str, backend: str | None = None) -> dict[str, Any]:
        view = self._view(self._info(run_id, backend), self.queue.get(run_id))
        del view["_submitted"]
        if view["queued"]:
            view["queue_position"] = self.queue.position(run_id)
        return view

    def submit_run(self, profile: str, overrides: list[str] | str | None = None, backend: str = "local", *,
                   name: str | None = None, who: str | None = None, schedule_id: str | None = None) -> dict[str, Any]:
        """Check the config, then: local, record the run and queue it for the run worker; kubeflow, submit it
        to KFP. Returns the run. Nothing is recorded for a config that does not load."""
        if backend not in BACKENDS:
            raise Invalid(f"unknown back end {backend!r}; choose local or kubeflow")
        name = (name or "").strip() or None
        if name and (len(name) > 100 or any(ord(c) < 32 for c in name)):
            raise Invalid("the run name must be at most 100 printable characters")
        checked = self.check_config(profile, overrides)
        overrides = checked["overrides"]
        if backend == "local":
            run_id = self.local.prepare(profile, overrides, name=name)
            self.queue.add(run_id, "local", schedule_id=schedule_id, who=who)
            if self.worker is not None:
                self.worker.wake()
        else:
            run_id = self._kubeflow().submit(profile, overrides, name=name)
            self.queue.add(run_id, "kubeflow", state=DONE, schedule_id=schedule_id, who=who)
        return self.get_run(run_id)

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
            import signal

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
        target = (base / relpath).resolve()
        if not target.is_relative_to(base) or not target.is_file():
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
        from kat_core.config import load_config
        from kat_core.manifest import read_manifest
        from kat_core.platform.tracking import EXPERIMENT, find_pipeline_run, pipeline_lineage

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
            out["mlflow_error"] = str(e)
        out["mlflow_hint"] = None if ui else self.mlflow_hint()
        if registered:
            registered = {k: v for k, v in registered.items() if k != "parent_run"}
            registered["url"] = f"{ui}/#/models/{registered['name']}/versions/{registered['version']}" if ui else None
        out["registered"] = registered
        return out

    def _experiment_id(self, name: str) -> str | None:
        from kat_core.platform.tracking import get_client

        exp = get_client(self.tracking_uri).get_experiment_by_name(name)
        return exp.experiment_id if exp else None

    # ---- models --------------------------------------------------------------------------------------------

    def _model_name(self, name: str) -> str:
        if not MODEL_NAME.match(name or ""):
            raise Invalid(f"bad model name {name!r}: letters, digits, '.', '_' and '-' only")
        return name

    def models(self) -> list[dict[str, Any]]:
        from kat_core.platform.registry import list_models

        return list_models(tracking_uri=self.tracking_uri)

    def model_names(self) -> list[str]:
        from kat_core.platform.tracking import get_client, mlflow_errors

        with mlflow_errors(self.tracking_uri):
            return sorted(m.name for m in get_client(self.tracking_uri).search_registered_models(max_results=1000))

    def _registered(self, name: str):
        """The registered model (aliases, tags with the alias history), or NotFound."""
        from mlflow.exceptions import MlflowException

        from kat_core.platform.tracking import get_client, mlflow_errors

        name = self._model_name(name)
        with mlflow_errors(self.tracking_uri):
            client = get_client(self.tracking_uri)
            try:
                return client.get_registered_model(name)
            except MlflowException as e:
                if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    raise NotFound(f"no registered model {name!r}") from None
                raise

    def model_overview(self, name: str) -> dict[str, Any]:
        """What the models page shows of `name`, in two registry queries: versions, aliases, history."""
        registered = self._registered(name)
        return {"name": name, "versions": self.versions(name, registered), "aliases": self._aliases(registered),
                "history": self._history(registered)}

    def versions(self, name: str, registered: Any = None) -> list[dict[str, Any]]:
        """Every version of `name`, newest first: aliases, when, evaluation summary, lineage pointers."""
        from kat_core.platform.registry import TAG_SUMMARY
        from kat_core.platform.tracking import get_client, mlflow_errors

        registered = registered or self._registered(name)
        ui = self.mlflow_ui()
        with mlflow_errors(self.tracking_uri):
            found = get_client(self.tracking_uri).search_model_versions(f"name = '{name}'", max_results=10_000)
        # a search does not fill in the versions' aliases (MLflow 3.17): the registered model has them
        aliases: dict[int, list[str]] = {}
        for alias, v in registered.aliases.items():
            aliases.setdefault(int(v), []).append(alias)
        out = []
        for mv in found:
            tags = dict(mv.tags)
            summary = json.loads(tags[TAG_SUMMARY]) if TAG_SUMMARY in tags else None
            out.append({
                "name": name, "version": int(mv.version), "aliases": sorted(aliases.get(int(mv.version), [])),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
                "evaluation": summary, "profile": tags.get("kat.profile"),
                "run_id": tags.get("kat.kfp_run_id"), "pipeline_run_id": tags.get("kat.pipeline_run_id"),
                "code_version": tags.get("kat.code_version"), "data": tags.get("kat.data.synthesize"),
                "url": f"{ui}/#/models/{name}/versions/{mv.version}" if ui else None,
            })
        return sorted(out, key=lambda v: v["version"], reverse=True)

    def version(self, name: str, version: int | str) -> dict[str, Any]:
        from kat_core.platform.registry import show_version

        name = self._model_name(name)
        try:
            return show_version(name, version, tracking_uri=self.tracking_uri)
        except KatError as e:
            raise NotFound(str(e)) from None

    @staticmethod
    def _aliases(registered: Any) -> dict[str, int]:
        return {alias: int(v) for alias, v in sorted(registered.aliases.items())}

    def aliases(self, name: str) -> dict[str, int]:
        return self._aliases(self._registered(name))

    @staticmethod
    def _history(registered: Any) -> list[dict[str, Any]]:
        from kat_core.platform.registry import EVENT_PREFIX

        tags = registered.tags
        return [json.loads(tags[k]) for k in sorted(tags) if k.startswith(EVENT_PREFIX)]

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every alias move of `name`, oldest first (registry.history's events, as dicts)."""
        return self._history(self._registered(name))

    def _version_report(self, name: str, version: int) -> dict[str, Any] | None:
        """The evaluation report registered with a version (its register run's report.json), cached."""
        from kat_core.platform.tracking import get_client, mlflow_errors

        info = self.version(name, version)
        key = info["register_run_id"] or f"{name}-{version}"
        if key in self._report_cache:
            return self._report_cache[key]
        cache = self.home / "dashboard" / "reports" / f"{key}.json"
        report = None
        if cache.is_file():
            report = json.loads(cache.read_text())
        elif info["register_run_id"]:
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            with mlflow_errors(self.tracking_uri), tempfile.TemporaryDirectory() as tmp:
                client = get_client(self.tracking_uri)
                try:
                    path = client.download_artifacts(info["register_run_id"], "report.json", tmp)
                    report = json.loads(Path(path).read_text())
                except Exception:  # no report.json logged (or unreadable): compare by the summaries
                    report = None
            if report is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp_path = cache.with_name(f".{cache.name}.tmp")
                tmp_path.write_text(json.dumps(report))
                os.replace(tmp_path, cache)
        self._report_cache[key] = report
        return report

    def compare(self, name: str, a: int, b: int) -> dict[str, Any]:
        """Version `a` (the baseline) against `b`: accuracy, tokens and think-on rate per mode, suite and
        difficulty level, the gate's verdict on b against a, and the frontier plot (`compare_plot`)."""
        from kat_core.eval.report import comparison
        from kat_core.platform.registry import EvalSummary, Margins, gate

        name = self._model_name(name)
        va, vb = self.version(name, a), self.version(name, b)
        ra, rb = self._version_report(name, int(a)), self._version_report(name, int(b))
        full = all(r and r.get("schema", "").startswith("kat-eval-report/") for r in (ra, rb))
        if full:
            result = comparison(ra, rb, {}, {}, (f"{name} v{a}", f"{name} v{b}"))
        else:
            result = {"a": f"{name} v{a}", "b": f"{name} v{b}", "rows": [], "levels": [], "gate": None}
            if va["evaluation"] and vb["evaluation"]:
                passed, reason = gate(EvalSummary(**vb["evaluation"]), EvalSummary(**va["evaluation"]),
                                      Margins.from_env())
                result["gate"] = {"passed": passed, "reason": reason}
        result["versions"] = {"a": va, "b": vb}
        result["full"] = full
        return result

    def compare_plot(self, name: str, a: int, b: int) -> Path:
        """The comparison's frontier plot (PNG: accuracy against tokens per mode, an arrow from a to b)."""
        from kat_core.eval import plots

        result = self.compare(name, a, b)
        if not result["full"]:
            raise NotFound(f"{name} v{a} and v{b} need full evaluation reports for a plot")
        keys = "-".join(str(result["versions"][k]["register_run_id"]) for k in ("a", "b"))
        path = self.home / "dashboard" / "plots" / f"compare-{keys}.png"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            plots.compare(result, path)
        return path

    def gate_preview(self, name: str, version: int) -> dict[str, Any]:
        """What the promotion gate says about `version` against the current champion."""
        from kat_core.platform.registry import CHAMPION, EvalSummary, Margins, gate

        info = self.version(name, version)
        champion = self.aliases(name).get(CHAMPION)
        if not info["evaluation"]:
            return {"passed": False, "champion": champion, "reason": "this version has no evaluation summary"}
        champ = self.version(name, champion)["evaluation"] if champion not in (None, int(version)) else None
        passed, reason = gate(EvalSummary(**info["evaluation"]), EvalSummary(**champ) if champ else None,
                              Margins.from_env())
        if champion == int(version):
            passed, reason = False, f"v{version} is already the champion"
        return {"passed": passed, "champion": champion, "reason": reason}

    @staticmethod
    def _reason(reason: str | None) -> str:
        reason = (reason or "").strip()
        if not reason:
            raise Invalid("a reason is required: it is recorded in the alias history")
        if len(reason) > 500:
            raise Invalid("the reason must be at most 500 characters")
        return reason

    def promote(self, name: str, version: int, reason: str | None, who: str | None = None, *,
                force: bool = False) -> dict[str, Any]:
        """Make `version` the champion: through the gate (margins KAT_GATE_ACC_MARGIN/KAT_GATE_TOK_MARGIN)
        unless `force`. Returns the alias event (None in "event" when it already was champion)."""
        from dataclasses import asdict

        from kat_core.platform.registry import Margins, promote

        name, reason = self._model_name(name), self._reason(reason)
        self.version(name, version)
        try:
            event = promote(name, int(version), reason, who, gate_margins=None if force else Margins.from_env(),
                            tracking_uri=self.tracking_uri)
        except KatError as e:
            if "gate keeps" in str(e):
                raise Conflict(str(e)) from None
            raise
        return {"event": asdict(event) if event else None, "aliases": self.aliases(name)}

    def rollback(self, name: str, reason: str | None, who: str | None = None) -> dict[str, Any]:
        from dataclasses import asdict

        from kat_core.platform.registry import rollback

        name, reason = self._model_name(name), self._reason(reason)
        self._registered(name)
        try:
            event = rollback(name, reason, who, tracking_uri=self.tracking_uri)
        except KatError as e:
            raise Conflict(str(e)) from None
        return {"event": asdict(event), "aliases": self.aliases(name)}

    # ---- schedules -----------------------------------------------------------------------------------------

    def list_schedules(self, backend: str | None = None) -> dict[str, Any]:
        """Local schedules (with their next fire time and last firing) and, when configured, KFP's."""
        from kat_core.platform import schedules

        out, warnings = [], []
        if backend in (None, "local"):
            last = self.queue.last_events()
            for s in schedules.list_all(home=self.home):
                item = {**s.to_dict(), "overrides": redact_overrides(s.overrides)}
                event = last.get(s.schedule_id)
                item["last"] = None if event is None else {
                    "at": datetime.fromtimestamp(event["at"], UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
                    "trigger": event["trigger"], "run_id": event["run_id"], "outcome": event["outcome"]}
                out.append(item)
        if backend == "kubeflow" or (backend is None and self.kfp_host):
            try:
                for s in self._kubeflow().list_schedules():
                    out.append({"schedule_id": s.schedule_id, "cron": s.cron, "profile": s.profile,
                                "overrides": redact_overrides(s.overrides), "name": s.name, "backend": "kubeflow",
                                "only_if_data_changed": False, "paused": not s.enabled, "next_fire": None,
                                "created_at": s.created_at, "who": None, "last": None})
            except KatError as e:
                if backend == "kubeflow":
                    raise
                warnings.append(f"kubeflow: {e}")
        return {"schedules": out, "warnings": warnings, "scheduler_running": self._scheduler_running()}

    def _scheduler_running(self) -> bool:
        from kat_core.platform import schedules

        if schedules.is_live(self.home):
            return True
        lock = self.home / "locks" / "scheduler.lock"
        if not lock.is_file():
            return False
        import fcntl

        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def create_schedule(self, cron: str, profile: str, overrides: list[str] | str | None = None, *,
                        name: str | None = None, backend: str = "local", only_if_data_changed: bool = False,
                        who: str | None = None) -> dict[str, Any]:
        from kat_core.platform import schedules

        if backend not in BACKENDS:
            raise Invalid(f"unknown back end {backend!r}; choose local or kubeflow")
        name = (name or "").strip() or None
        if name and len(name) > 100:
            raise Invalid("the schedule name must be at most 100 characters")
        overrides = self.check_config(profile, overrides)["overrides"]
        try:
            if backend == "kubeflow":
                if only_if_data_changed:
                    raise Invalid("'only if the training data changed' needs the local scheduler; "
                                  "KFP recurring runs fire unconditionally")
                schedule_id = self._kubeflow().schedule(cron, profile, overrides, name=name)
                return {"schedule_id": schedule_id, "backend": "kubeflow", "cron": cron, "profile": profile,
                        "overrides": redact_overrides(overrides), "name": name}
            created = schedules.create(cron, profile, overrides, name=name, only_if_data_changed=only_if_data_changed,
                                       who=who, home=self.home)
            return {**created.to_dict(), "overrides": redact_overrides(created.overrides)}
        except Invalid:
            raise
        except KatError as e:
            if "cron" in str(e):
                raise Invalid(str(e)) from None
            raise

    def _local_schedule(self, schedule_id: str, action):
        try:
            return action(schedule_id, home=self.home)
        except KatError as e:
            if "unknown schedule id" in str(e):
                raise NotFound(str(e)) from None
            raise

    def get_schedule(self, schedule_id: str) -> dict[str, Any]:
        from kat_core.platform import schedules

        found = self._local_schedule(schedule_id, schedules.get)
        item = {**found.to_dict(), "overrides": redact_overrides(found.overrides)}
        item["events"] = [{**e, "at": datetime.fromtimestamp(e["at"], UTC).strftime("%Y-%m-%d %H:%M:%SZ")}
                          for e in self.queue.events(schedule_id, 20)]
        return item

    def pause_schedule(self, schedule_id: str) -> dict[str, Any]:
        from kat_core.platform import schedules

        self._require_local_schedule(schedule_id)
        found = self._local_schedule(schedule_id, schedules.pause)
        return {**found.to_dict(), "overrides": redact_overrides(found.overrides)}

    def resume_schedule(self, schedule_id: str) -> dict[str, Any]:
        from kat_core.platform import schedules

        self._require_local_schedule(schedule_id)
        found = self._local_schedule(schedule_id, schedules.resume)
        return {**found.to_dict(), "overrides": redact_overrides(found.overrides)}

    def trigger_schedule(self, schedule_id: str) -> dict[str, Any]:
        from kat_core.platform import schedules

        self._require_local_schedule(schedule_id)
        self._local_schedule(schedule_id, schedules.trigger)
        return {"schedule_id": schedule_id, "triggered": True, "scheduler_running": self._scheduler_running()}

    def delete_schedule(self, schedule_id: str, backend: str | None = None) -> None:
        from kat_core.platform import schedules

        if backend == "local" or (backend is None and schedule_id.startswith("sched-")):
            self._local_schedule(schedule_id, schedules.delete)
        else:
            self._kubeflow().delete_schedule(schedule_id)

    @staticmethod
    def _require_local_schedule(schedule_id: str) -> None:
        if not schedule_id.startswith("sched-"):
            raise Invalid("pause, resume and trigger KFP recurring runs in the Kubeflow Pipelines UI")

    def data_changed_since_champion(self, profile: str, overrides: list[str]) -> tuple[bool, str]:
        """Whether the training data a run of this config would train on differs from the champion's: the
        dataset is synthesized (seeded: the same config gives the same data) and its digest compared with
        the digest registered with the champion (`kat.data.synthesize`)."""
        from kat_core.config import load_config
        from kat_core.data.synth import synthesize
        from kat_core.manifest import dir_digest
        from kat_core.platform.registry import CHAMPION, show_version

        config = load_config(profile, overrides)
        name = config.registry.model_name
        try:
            champion = show_version(name, CHAMPION, tracking_uri=self.tracking_uri)
        except KatError:
            return True, f"{name} has no champion yet"
        recorded = champion["data"].get("synthesize")
        if not recorded:
            return True, f"champion v{champion['version']} records no training-data digest"
        scratch = self.home / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            synthesize(config, Path(tmp) / "data", progress=False)
            digest = dir_digest(Path(tmp) / "data")
        if digest == recorded:
            return False, f"training data unchanged since champion v{champion['version']} (digest {digest[:12]})"
        return True, (f"training data changed since champion v{champion['version']} "
                      f"({recorded[:12]} -> {digest[:12]})")

    def fire_schedule(self, schedule_id: str, *, trigger: str = "cron", profile: str, overrides: list[str],
                      only_if_data_changed: bool = False, name: str | None = None, **_: Any) -> dict[str, Any]:
        """A schedule fires: check the data when asked to, submit a run (the pipeline's register stage
        promotes only through the gate), record what happened."""
        try:
            why = ""
            if only_if_data_changed:
                changed, why = self.data_changed_since_champion(profile, overrides)
                if not changed:
                    self.queue.add_event(schedule_id, trigger, f"skipped: {why}")
                    return {"run_id": None, "outcome": f"skipped: {why}"}
            run = self.submit_run(profile, overrides, "local", name=name or f"schedule {schedule_id}",
                                  who=f"schedule {schedule_id}", schedule_id=schedule_id)
            outcome = f"submitted run {run['run_id']}" + (f" ({why})" if why else "")
            self.queue.add_event(schedule_id, trigger, outcome, run["run_id"])
            return {"run_id": run["run_id"], "outcome": outcome}
        except KatError as e:
            self.queue.add_event(schedule_id, trigger, f"failed: {e}")
            raise

    # ---- datasets ------------------------------------------------------------------------------------------

    def datasets(self, limit: int = 200) -> list[dict[str, Any]]:
        """The synthesized datasets of local runs (one entry per dataset digest, with the runs that made or
        used it), their validation outcome and a link target for the Great Expectations data docs."""
        from kat_core.manifest import dir_digest, read_manifest

        found: dict[str, dict[str, Any]] = {}
        for info in self.local.list_runs(limit):
            stages = {s.name: s for s in info.stages}
            synth = stages.get("synthesize")
            if synth is None or "dataset" not in synth.outputs:
                continue
            path = synth.outputs["dataset"]
            manifest = read_manifest(Path(path)) or {}
            digest = dir_digest(Path(path)) if manifest else None
            entry = found.get(digest or path)  # the same data made again (another config) is one dataset
            if entry is None:
                entry = found[digest or path] = {
                    "path": path, "exists": Path(path).is_dir(), "runs": [], "digest": digest,
                    "records": manifest.get("records"), "items": manifest.get("items"),
                    "modes": (manifest.get("counts") or {}).get("mode"), "rejects": manifest.get("rejects"),
                    "created_at": manifest.get("created_at"), "config_hash": manifest.get("config_hash"),
                    "profile": info.profile, "validation": None,
                }
            entry["runs"].append(info.run_id)
            check = stages.get("validate")
            if entry["validation"] is None and check is not None:
                entry["validation"] = self._validation(info.run_id, check)
        return sorted(found.values(), key=lambda d: d.get("created_at") or "", reverse=True)

    @staticmethod
    def _validation(run_id: str, stage) -> dict[str, Any]:
        result: dict[str, Any] = {"status": stage.status, "run_id": run_id, "error": redact_text(stage.error or "")}
        report = stage.outputs.get("report")
        if report and (Path(report) / "validation.json").is_file():
            summary = json.loads((Path(report) / "validation.json").read_text())
            result.update({"success": summary.get("success"), "passed": summary.get("passed"),
                           "total": summary.get("total"),
                           "failed": [f.get("name", str(f)) if isinstance(f, dict) else str(f)
                                      for f in summary.get("failed") or []]})
            if (Path(report) / "docs" / "index.html").is_file():
                result["docs"] = f"/runs/{run_id}/files/validate/report/docs/index.html"
        elif stage.status == "failed" and stage.error and "report: " in stage.error:
            path = Path(stage.error.split("report: ", 1)[1].split()[0].rstrip(").,;"))
            summary = json.loads(path.read_text()) if path.name.endswith(".json") and path.is_file() else {}
            result.update({"success": False, "passed": summary.get("passed"), "total": summary.get("total"),
                           "failed": [f.get("name", str(f)) if isinstance(f, dict) else str(f)
                                      for f in summary.get("failed") or []]})
        return result

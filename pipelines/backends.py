"""Run back ends behind one interface: `local` (kfp.local in this process) and `kubeflow` (kfp.Client).

    backend = get_backend("local")            # or get_backend("kubeflow", host=..., token=...)
    run_id = backend.submit("smoke", ["train.steps=10"])
    backend.status(run_id).stages             # per-stage status, seconds and outputs

The local back end keeps its state under KAT_HOME (default `./.kat`):

    pipeline_root/        kfp.local task outputs (and its cache, pipeline_root/.kfp_cache)
    runs/<run id>/        run.json (what `kat runs show` prints) and pipeline.log (every task's output)
    checkpoints/          resumable work of training stages (see components/runtime.py `resumable`)
    scheduler.db          cron schedules (APScheduler's job store; `kat serve` or `kat scheduler` fires them)
"""

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.runtime import code_digest
from kat_core.errors import KatError
from kat_core.platform.jobs import pid_alive

BACKENDS = ("local", "kubeflow")

log = logging.getLogger(__name__)


def kat_home() -> Path:
    return Path(os.environ.get("KAT_HOME", ".kat"))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class StageInfo:
    name: str
    status: str  # running | succeeded | cached | failed (kubeflow: its task state, lower case)
    seconds: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # output name -> URI (a local path on `local`)
    error: str | None = None


@dataclass
class RunInfo:
    run_id: str
    backend: str
    status: str  # pending | running | succeeded | failed | cancelled
    profile: str | None = None
    overrides: list[str] = field(default_factory=list)
    name: str | None = None
    created_at: str | None = None
    finished_at: str | None = None
    stages: list[StageInfo] = field(default_factory=list)
    error: str | None = None
    log: str | None = None
    pid: int | None = None
    started_at: str | None = None  # when it left the queue (local back end)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunInfo":
        return cls(**{**data, "stages": [StageInfo(**s) for s in data.get("stages", [])]})


@dataclass
class ScheduleInfo:
    schedule_id: str
    backend: str
    cron: str
    profile: str | None
    overrides: list[str] = field(default_factory=list)
    name: str | None = None
    enabled: bool = True
    created_at: str | None = None


class RunBackend(ABC):
    """Start, watch, cancel and schedule AutoThink pipeline runs somewhere."""

    name: str

    @abstractmethod
    def submit(self, profile: str, overrides: list[str] | None = None, *, name: str | None = None) -> str:
        """Start a run of the pipeline on `profile`; returns its run id."""

    @abstractmethod
    def status(self, run_id: str) -> RunInfo: ...

    @abstractmethod
    def list_runs(self, limit: int = 20) -> list[RunInfo]:
        """The newest runs first."""

    @abstractmethod
    def cancel(self, run_id: str) -> None: ...

    @abstractmethod
    def schedule(self, cron: str, profile: str, overrides: list[str] | None = None, *,
                 name: str | None = None) -> str:
        """Run the pipeline on `profile` at the times of a 5-field cron expression; returns the schedule id."""

    @abstractmethod
    def list_schedules(self) -> list[ScheduleInfo]: ...

    @abstractmethod
    def delete_schedule(self, schedule_id: str) -> None: ...


def get_backend(name: str, **kwargs: Any) -> RunBackend:
    if name == "local":
        return LocalBackend(**kwargs)
    if name == "kubeflow":
        return KubeflowBackend(**kwargs)
    raise KatError(f"unknown back end {name!r}; known: {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------------------------- cron

_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
                ("day of week", 0, 7))
_CRON_NAMES = {3: "jan feb mar apr may jun jul aug sep oct nov dec".split(), 4: "sun mon tue wed thu fri sat".split()}


def check_cron(expr: str) -> str:
    """The expression, normalised, if it is a valid 5-field cron (minute hour day month weekday); else a
    KatError that says which field is wrong. Both back ends check it before anything is stored."""
    parts = expr.split()
    if len(parts) != 5:
        raise KatError(f"bad cron {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week), "
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
            raise KatError(f"bad cron {expr!r}: {what} field {part!r} "
                           f"(allowed: {lo}-{hi}, *, a-b, */n and lists of them)") from None
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- local


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; run records are meant to be read
    os.replace(tmp, path)


Event = Callable[[str, StageInfo], None]  # (kind: "start" | "end", stage)


def _failure_reason(log_text: str) -> str | None:
    """The reason a task failed, from its log: the component's `error:` line, else the traceback's last line."""
    lines = [line.strip() for line in log_text.splitlines()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Failed|Interrupt)\b.*", line):
            return line
    return None


class LocalBackend(RunBackend):
    """Runs the pipeline in this process with kfp.local's SubprocessRunner (each task a subprocess of the
    current Python environment), task caching on, outputs under KAT_HOME."""

    name = "local"

    def __init__(self, home: str | Path | None = None, on_event: Event | None = None):
        self.home = Path(home) if home is not None else kat_home()
        self.on_event = on_event

    # -- runs

    def _run_dir(self, run_id: str) -> Path:
        return self.home / "runs" / run_id

    def _save(self, info: RunInfo) -> None:
        _write_json(self._run_dir(info.run_id) / "run.json", info.to_dict())

    def submit(self, profile: str, overrides: list[str] | None = None, *, name: str | None = None,
               out: str | Path | None = None) -> str:
        """Run the pipeline to its end (this call blocks) and return the run id; a failed run is recorded
        with its failed stage and reason, not raised. `out`, if given, gets a link per stage output."""
        run_id = self.prepare(profile, overrides, name=name)
        self.execute(run_id, out=out)
        return run_id

    def prepare(self, profile: str, overrides: list[str] | None = None, *, name: str | None = None) -> str:
        """Record a run that has not started yet (status `pending`) and return its id; `execute` runs it.
        A bad profile or override fails here, before anything is recorded. The dashboard's queue prepares
        runs in the web process and executes each in a worker process of its own (`pipelines.worker`)."""
        from kat_core.config import load_config

        overrides = list(overrides or [])
        load_config(profile, overrides)
        run_id = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        run_dir = self._run_dir(run_id)
        run_dir.mkdir(parents=True)
        self._save(RunInfo(run_id=run_id, backend=self.name, status="pending", profile=profile, overrides=overrides,
                           name=name, created_at=_now(), log=str((run_dir / "pipeline.log").resolve())))
        return run_id

    def execute(self, run_id: str, *, out: str | Path | None = None) -> RunInfo:
        """Run a prepared run in this process to its end and return its record (nothing happens to a run
        cancelled before it started)."""
        from kat_core.config import load_config
        from kat_core.manifest import config_hash

        info = self.status(run_id)
        if info.status != "pending":
            if info.status == "cancelled":
                return info
            raise KatError(f"run {run_id} was already started (it is {info.status})")
        profile, overrides = info.profile or "demo", list(info.overrides)
        config = load_config(profile, overrides)
        info.status, info.pid, info.started_at = "running", os.getpid(), _now()
        self._save(info)
        salt = hashlib.sha256(f"{config_hash(config)}:{code_digest()}".encode()).hexdigest()[:16]
        try:
            self._execute(info, profile, overrides, salt)
        except BaseException as e:  # Ctrl-C included: the record must not stay "running"
            info.status = "cancelled" if isinstance(e, KeyboardInterrupt) else "failed"
            info.error = info.error or f"{type(e).__name__}: {e}"
            raise
        finally:
            info.finished_at = _now()
            info.pid = None
            self._save(info)
            _close_tracking(run_id, info.status)
            if out is not None:
                self._link_outputs(info, Path(out))
        return info

    def _execute(self, info: RunInfo, profile: str, overrides: list[str], salt: str) -> None:
        from kfp import local

        from pipelines.autothink import build_pipeline

        # retries are for a cluster's transient failures; here they would only repeat a deterministic error
        pipeline = build_pipeline(profile, overrides, retries=0, cache_salt=salt)
        root = (self.home / "pipeline_root").resolve()
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=True)
        # inherited by the task subprocesses, so not part of their cache keys; KAT_RUN_ID lets a stage tag
        # what it logs (tracking) with the run it belongs to
        env = {"KAT_CHECKPOINT_DIR": str((self.home / "checkpoints").resolve()), "KAT_RUN_ID": info.run_id,
               "KAT_HOME": str(self.home.resolve()), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        stages: dict[str, StageInfo] = {}
        log = open(info.log, "a", buffering=1)  # every task's output; stdout goes here during the run

        def started(task: str) -> None:
            stage = stages[task] = StageInfo(name=task, status="running")
            info.stages.append(stage)
            self._save(info)
            print(f"\n==> kat: task {task}", flush=True)  # a marker in the log, to find this task's part
            if self.on_event:
                self.on_event("start", stage)

        def ended(task: str, outputs: dict[str, Any], ok: bool, seconds: float, run_root: str) -> None:
            stage = stages[task]
            stage.seconds = round(seconds, 2)
            stage.outputs = {k: v.uri for k, v in outputs.items() if hasattr(v, "uri")}
            # a cache hit hands back the outputs of the run that made them, outside this run's folder
            fresh = all(uri.startswith(run_root) for uri in stage.outputs.values())
            stage.status = "failed" if not ok else ("succeeded" if fresh else "cached")
            if not ok:
                log.flush()
                part = Path(info.log).read_text(errors="replace").rsplit(f"==> kat: task {task}\n", 1)[-1]
                stage.error = _failure_reason(part) or "see the log"
                info.error = f"{task}: {stage.error}"
            self._save(info)
            if self.on_event:
                self.on_event("end", stage)

        with log, _patched_env(env), contextlib.redirect_stdout(log), warnings.catch_warnings(), \
                _observe_tasks(started, ended, str(root)):
            # kfp.local warns about every image without "python" in its name, and about settings it ignores
            warnings.simplefilter("ignore")
            try:
                pipeline(profile=profile, overrides=overrides)
            except RuntimeError:
                if not any(s.status == "failed" for s in info.stages):
                    raise  # not a task failure: a bug, keep its traceback
        info.status = "failed" if any(s.status == "failed" for s in info.stages) else "succeeded"

    def _link_outputs(self, info: RunInfo, out: Path) -> None:
        """`out/<stage>` (or `out/<stage>.<output>`) links to each output, and `out/run.json`."""
        out.mkdir(parents=True, exist_ok=True)
        for stage in info.stages:
            for key, uri in stage.outputs.items():
                link = out / (stage.name if len(stage.outputs) == 1 else f"{stage.name}.{key}")
                tmp = link.with_name(f".{link.name}.tmp")
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(Path(uri).resolve(), target_is_directory=True)
                os.replace(tmp, link)
        _write_json(out / "run.json", info.to_dict())

    def status(self, run_id: str) -> RunInfo:
        path = self._run_dir(run_id) / "run.json"
        if not re.fullmatch(r"[\w.-]+", run_id) or not path.is_file():
            raise KatError(f"unknown run id {run_id!r} on the local back end ({self.home / 'runs'})")
        info = RunInfo.from_dict(json.loads(path.read_text()))
        if info.status == "running" and not pid_alive(info.pid):
            info.status, info.error = "failed", "its process ended without recording a result (killed?)"
        return info

    def list_runs(self, limit: int = 20) -> list[RunInfo]:
        runs_dir = self.home / "runs"
        ids = sorted((p.name for p in runs_dir.iterdir() if (p / "run.json").is_file()), reverse=True) \
            if runs_dir.is_dir() else []  # ids start with the start time: newest first
        return [self.status(run_id) for run_id in ids[:limit]]

    def cancel(self, run_id: str) -> None:
        """Stop a running local run: SIGTERM to its process group when the run leads one (a `kat run`
        started from a shell, or a dashboard worker process), else to its process; the record says
        cancelled, and so does its MLflow parent run. A run that has not started yet just never will."""
        import signal

        info = self.status(run_id)
        if info.status not in ("running", "pending"):
            raise KatError(f"run {run_id} is not running (it is {info.status})")
        if info.status == "running" and info.pid:
            pgid = os.getpgid(info.pid)
            if pgid == info.pid and pgid != os.getpgid(0):
                os.killpg(pgid, signal.SIGTERM)
            else:
                os.kill(info.pid, signal.SIGTERM)
        info.status, info.finished_at, info.pid = "cancelled", _now(), None
        self._save(info)
        _close_tracking(run_id, "cancelled")

    # -- schedules: kept in the APScheduler job store under KAT_HOME (kat_core.platform.schedules), which
    # `kat serve` / `kat scheduler` run; a schedules.json of earlier versions is moved there on first use

    def schedule(self, cron: str, profile: str, overrides: list[str] | None = None, *,
                 name: str | None = None) -> str:
        from kat_core.platform import schedules

        return schedules.create(cron, profile, overrides, name=name, home=self.home).schedule_id

    def list_schedules(self) -> list[ScheduleInfo]:
        from kat_core.platform import schedules

        return [ScheduleInfo(schedule_id=s.schedule_id, backend=self.name, cron=s.cron, profile=s.profile,
                             overrides=s.overrides, name=s.name, enabled=not s.paused, created_at=s.created_at)
                for s in schedules.list_all(home=self.home)]

    def delete_schedule(self, schedule_id: str) -> None:
        from kat_core.platform import schedules

        schedules.delete(schedule_id, home=self.home)


@contextlib.contextmanager
def _patched_env(env: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the task subprocesses (they inherit ours), restored afterwards."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _observe_tasks(started: Callable[[str], None], ended: Callable[..., None], pipeline_root: str) -> Iterator[None]:
    """Call `started(task)` and `ended(task, outputs, ok, seconds, run_root)` around every task kfp.local runs.

    kfp.local has no callback API; both of its orchestrators run each task through
    `task_executor.execute_single_task` (kfp 2.17), which returns the task's outputs and status (cache hits
    included, after its retries), so we wrap that one function for the duration of the run."""
    from kfp.local import status as kfp_status
    from kfp.local.orchestrator import task_executor

    original = task_executor.execute_single_task

    def observed(*args: Any, **kwargs: Any) -> Any:
        task, run_name = kwargs["task_name"], kwargs["pipeline_resource_name"]
        started(task)
        t0 = time.perf_counter()
        outputs, task_status = original(*args, **kwargs)
        ended(task, outputs, task_status == kfp_status.Status.SUCCESS, time.perf_counter() - t0,
              os.path.join(pipeline_root, run_name) + os.sep)
        return outputs, task_status

    task_executor.execute_single_task = observed
    try:
        yield
    finally:
        task_executor.execute_single_task = original


# ---------------------------------------------------------------------------------------------- kubeflow

_KFP_STATES = {"PENDING": "pending", "RUNNING": "running", "SUCCEEDED": "succeeded", "SKIPPED": "succeeded",
               "FAILED": "failed", "CANCELING": "cancelled", "CANCELED": "cancelled", "PAUSED": "pending",
               "RUNTIME_STATE_UNSPECIFIED": "pending"}


def _iso(value: Any) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(value, datetime) else value


class KubeflowBackend(RunBackend):
    """Kubeflow Pipelines through kfp.Client: host from `host` or KFP_HOST, auth by a bearer token
    (`token`/KFP_TOKEN) or a session cookie (`cookie`/KFP_COOKIE, e.g. `authservice_session=...`)."""

    name = "kubeflow"

    def __init__(self, host: str | None = None, token: str | None = None, cookie: str | None = None,
                 namespace: str | None = None, experiment: str | None = None, cluster: bool | None = None):
        self.host = (host or os.environ.get("KFP_HOST") or os.environ.get("KF_PIPELINES_ENDPOINT") or "").rstrip("/")
        if not self.host:
            raise KatError("no Kubeflow Pipelines endpoint: pass --host or set KFP_HOST")
        if not self.host.startswith(("http://", "https://")):
            self.host = "https://" + self.host
        self.token = token or os.environ.get("KFP_TOKEN")
        self.cookie = cookie or os.environ.get("KFP_COOKIE")
        self.namespace = namespace or os.environ.get("KFP_NAMESPACE")
        self.experiment = experiment or os.environ.get("KFP_EXPERIMENT", "kat")
        self.cluster = cluster  # None: the kfp-kubernetes settings when the profile is "cluster"
        self._service_account: str | None = None  # set by _package for the run it compiles
        self._client_obj = None

    # -- the client, and errors a user can act on

    def _probe(self) -> None:
        """One quick healthz request, so an unreachable or refusing endpoint is one clear line, not the
        client's five retries 5 s apart followed by a traceback."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(f"{self.host}/apis/v2beta1/healthz")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        if self.cookie:
            request.add_header("Cookie", self.cookie)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as e:
            hint = "; set KFP_TOKEN or KFP_COOKIE" if e.code in (401, 403) else ""
            raise KatError(f"Kubeflow Pipelines at {self.host} answered HTTP {e.code} ({e.reason}){hint}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise KatError(f"cannot reach Kubeflow Pipelines at {self.host}: {reason}") from None

    def _client(self):
        if self._client_obj is None:
            self._probe()
            import kfp

            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # "This client only works with KFP v2.0.0-beta.2 and later"
                self._client_obj = kfp.Client(host=self.host, existing_token=self.token, cookies=self.cookie,
                                              namespace=self.namespace or "kubeflow")
        return self._client_obj

    @contextlib.contextmanager
    def _api(self, what: str) -> Iterator[None]:
        """kfp_server_api errors -> one KatError line; the client's own prints (links) are swallowed."""
        from kfp_server_api.exceptions import ApiException

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        except ApiException as e:
            message = e.reason
            with contextlib.suppress(Exception):
                message = json.loads(e.body).get("message") or message
            if e.status == 404:
                raise KatError(f"{what}: not found on {self.host} ({message})") from None
            raise KatError(f"{what}: Kubeflow Pipelines answered HTTP {e.status} ({message})") from None

    def _package(self, profile: str, overrides: list[str], tmp: str) -> str:
        from kat_core.config import load_config
        from pipelines.compile import compile_pipeline

        if profile.endswith((".yaml", ".yml")):  # the tasks load their profile inside the image
            raise KatError(f"profile {profile!r} is a local file; on kubeflow use a shipped profile "
                           "(smoke, demo, cluster) with --set overrides")
        config = load_config(profile, overrides)
        cluster = self.cluster if self.cluster is not None else config.profile == "cluster"
        # a cluster run's pods use the platform's service account (helm/kat-platform): it may create TrainJobs
        self._service_account = config.cluster.service_account if cluster else None
        return str(compile_pipeline(Path(tmp) / "autothink.yaml", profile, overrides, cluster=cluster))

    def _experiment_id(self) -> str:
        with self._api(f"experiment {self.experiment!r}"):
            return self._client().create_experiment(self.experiment, namespace=self.namespace).experiment_id

    # -- runs

    def submit(self, profile: str, overrides: list[str] | None = None, *, name: str | None = None) -> str:
        overrides = list(overrides or [])
        with tempfile.TemporaryDirectory() as tmp:
            package = self._package(profile, overrides, tmp)  # a bad profile fails before any request
            client, experiment_id = self._client(), self._experiment_id()
            with self._api("submit"):
                result = client.create_run_from_pipeline_package(
                    package, arguments={"profile": profile, "overrides": overrides}, experiment_id=experiment_id,
                    run_name=name or f"kat-{profile}-{time.strftime('%Y%m%d-%H%M%S')}",
                    service_account=self._service_account)
        return result.run_id

    def _run_info(self, run: Any) -> RunInfo:
        params = (run.runtime_config.parameters or {}) if run.runtime_config else {}
        stages = [
            StageInfo(name=t.display_name or t.task_id, status=_KFP_STATES.get(str(t.state), str(t.state).lower()),
                      seconds=(t.end_time - t.start_time).total_seconds()
                      if isinstance(t.start_time, datetime) and isinstance(t.end_time, datetime) else None,
                      error=t.error.message if t.error else None)
            for t in ((run.run_details.task_details or []) if run.run_details else [])
        ]
        return RunInfo(run_id=run.run_id, backend=self.name, status=_KFP_STATES.get(str(run.state), "pending"),
                       profile=params.get("profile"), overrides=list(params.get("overrides") or []),
                       name=run.display_name, created_at=_iso(run.created_at), finished_at=_iso(run.finished_at),
                       stages=stages, error=run.error.message if run.error else None)

    def status(self, run_id: str) -> RunInfo:
        client = self._client()
        with self._api(f"run {run_id}"):
            return self._run_info(client.get_run(run_id))

    def list_runs(self, limit: int = 20) -> list[RunInfo]:
        client = self._client()
        with self._api("list runs"):
            response = client.list_runs(page_size=limit, sort_by="created_at desc", namespace=self.namespace)
        return [self._run_info(r) for r in response.runs or []]

    def cancel(self, run_id: str) -> None:
        client = self._client()
        with self._api(f"run {run_id}"):
            client.terminate_run(run_id)

    # -- schedules: KFP recurring runs

    def schedule(self, cron: str, profile: str, overrides: list[str] | None = None, *,
                 name: str | None = None) -> str:
        cron = check_cron(cron)
        overrides = list(overrides or [])
        with tempfile.TemporaryDirectory() as tmp:
            package = self._package(profile, overrides, tmp)
            client, experiment_id = self._client(), self._experiment_id()
            with self._api("schedule"):
                recurring = client.create_recurring_run(
                    experiment_id=experiment_id, job_name=name or f"kat-{profile}-retrain",
                    # KFP's cron (robfig/cron) has a leading seconds field
                    cron_expression=f"0 {cron}", max_concurrency=1, no_catchup=True,
                    params={"profile": profile, "overrides": overrides}, pipeline_package_path=package,
                    service_account=self._service_account)
        return recurring.recurring_run_id

    def list_schedules(self) -> list[ScheduleInfo]:
        client = self._client()
        with self._api("list schedules"):
            response = client.list_recurring_runs(page_size=100, namespace=self.namespace)
        out = []
        for r in response.recurring_runs or []:
            cron = r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else ""
            params = (r.runtime_config.parameters or {}) if r.runtime_config else {}
            out.append(ScheduleInfo(
                schedule_id=r.recurring_run_id, backend=self.name,
                cron=cron.split(" ", 1)[1] if len(cron.split()) == 6 else cron,
                profile=params.get("profile"), overrides=list(params.get("overrides") or []),
                name=r.display_name, enabled=str(r.mode) != "DISABLE" and str(r.status) != "DISABLED",
                created_at=_iso(r.created_at)))
        return out

    def delete_schedule(self, schedule_id: str) -> None:
        client = self._client()
        with self._api(f"schedule {schedule_id}"):
            client.delete_recurring_run(schedule_id)


def _close_tracking(run_id: str, status: str) -> None:
    """End the run's MLflow parent run (its stages opened it) with the run's outcome; no parent, nothing to do."""
    from kat_core.errors import KatError
    from kat_core.platform.tracking import end_pipeline_run, find_pipeline_run

    try:
        parent = find_pipeline_run(run_id)
        if parent:
            end_pipeline_run(parent, status)
    except KatError as e:  # tracking trouble must not turn a finished run into a failed one
        log.warning("could not close the MLflow run of %s: %s", run_id, e)

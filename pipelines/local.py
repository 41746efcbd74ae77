"""The local back end: the pipeline in this process with kfp.local's SubprocessRunner (each task a
subprocess of the current Python environment), task caching on, state under KAT_HOME (kat_core.platform.kat_home):

    pipeline_root/        kfp.local task outputs (and its cache, pipeline_root/.kfp_cache)
    runs/<run id>/        run.json (what `kat runs show` prints), pipeline.log (every task's output, as a
                          person reads it) and pipeline.debug.log (all of it: executor JSON, colours, bars)
    checkpoints/          resumable work of training stages (see components/runtime.py `resumable`)
    scheduler.db          cron schedules (the application's store, handed in as `schedules`)
"""

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.runtime import code_digest
from kat_core.config import load_config
from kat_core.errors import Conflict, KatError, NotFound
from kat_core.platform import kat_home
from kat_core.util import atomic_write_json, patched_env, pid_alive
from pipelines.interface import RunBackend, ScheduleStore
from pipelines.records import RunInfo, ScheduleInfo, StageInfo, now_iso
from pipelines.runlog import RunLog

log = logging.getLogger(__name__)

Event = Callable[[str, StageInfo], None]  # (kind: "start" | "progress" | "end", stage)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_text(step: int, total: int, loss: float, elapsed: float, first: tuple[int, float] | None) -> str:
    """`step 50/300 · loss 1.392 · 1m50s · ETA 4m30s`; the ETA from the pace since the first step line seen
    (`first`: its step and elapsed time), else since the stage started."""
    done, spent = (step - first[0], elapsed - first[1]) if first and step > first[0] else (step, elapsed)
    eta = f" · ETA {_duration(spent / done * (total - step))}" if done > 0 and step < total else ""
    return f"step {step}/{total} · loss {loss:.4g} · {_duration(elapsed)}{eta}"


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

    def __init__(self, home: str | Path | None = None, on_event: Event | None = None,
                 schedules: ScheduleStore | None = None):
        self.home = Path(home) if home is not None else kat_home()
        self.on_event = on_event
        self.schedules = schedules

    # -- runs

    def _run_dir(self, run_id: str) -> Path:
        return self.home / "runs" / run_id

    def _save(self, info: RunInfo) -> None:
        atomic_write_json(self._run_dir(info.run_id) / "run.json", info.to_dict())

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
        overrides = list(overrides or [])
        load_config(profile, overrides)
        run_id = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        run_dir = self._run_dir(run_id)
        run_dir.mkdir(parents=True)
        self._save(RunInfo(run_id=run_id, backend=self.name, status="pending", profile=profile, overrides=overrides,
                           name=name, created_at=now_iso(), log=str((run_dir / "pipeline.log").resolve())))
        return run_id

    def execute(self, run_id: str, *, out: str | Path | None = None) -> RunInfo:
        """Run a prepared run in this process to its end and return its record (nothing happens to a run
        cancelled before it started)."""
        info = self.status(run_id)
        if info.status != "pending":
            if info.status == "cancelled":
                return info
            raise Conflict(f"run {run_id} was already started (it is {info.status})")
        profile, overrides = info.profile or "demo", list(info.overrides)
        load_config(profile, overrides)  # the one config check, before anything runs
        info.status, info.pid, info.started_at = "running", os.getpid(), now_iso()
        self._save(info)
        # the code (and the shipped profiles) the tasks run: the config is in each task's own inputs, scoped to
        # what the stage reads (components/configure.py), so it must not be in a salt every task shares
        salt = code_digest()
        try:
            self._execute(info, profile, overrides, salt)
        except BaseException as e:  # Ctrl-C included: the record must not stay "running"
            info.status = "cancelled" if isinstance(e, KeyboardInterrupt) else "failed"
            info.error = info.error or f"{type(e).__name__}: {e}"
            raise
        finally:
            info.finished_at = now_iso()
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
        clock: dict[str, Any] = {}  # the running stage: its name, start time and first step line seen

        def step_seen(step: int, total: int, loss: float) -> None:
            stage = stages.get(clock.get("task", ""))
            if stage is None or stage.status != "running":
                return
            elapsed = time.monotonic() - clock["t0"]
            clock.setdefault("first", (step, elapsed))
            stage.progress = progress_text(step, total, loss, elapsed, clock["first"])
            self._save(info)
            if self.on_event:
                self.on_event("progress", stage)

        # every task's output: readable lines in pipeline.log, all of it in pipeline.debug.log
        human = open(info.log, "a", buffering=1)
        debug = open(Path(info.log).with_name("pipeline.debug.log"), "a", buffering=1)
        log = RunLog(human, debug, on_step=step_seen)

        def started(task: str) -> None:
            stage = stages[task] = StageInfo(name=task, status="running")
            clock.clear()
            clock.update(task=task, t0=time.monotonic())
            info.stages.append(stage)
            self._save(info)
            print(f"\n==> kat: task {task}", flush=True)  # a marker in the log, to find this task's part
            if self.on_event:
                self.on_event("start", stage)

        def ended(task: str, outputs: dict[str, Any], ok: bool, seconds: float, run_root: str) -> None:
            stage = stages[task]
            stage.seconds = round(seconds, 2)
            stage.outputs = {k: v.uri for k, v in outputs.items() if hasattr(v, "uri")}
            task_dir = Path(run_root) / task
            if not ok and task_dir.is_dir():
                # a failed task returns no outputs, but what it wrote before failing is in its folder of the run
                # (a failed validation's report, which says why)
                stage.outputs = {p.name: str(p) for p in sorted(task_dir.iterdir()) if not p.name.startswith(".")}
            # a cache hit hands back the outputs of the run that made them, outside this run's folder
            fresh = all(uri.startswith(run_root) for uri in stage.outputs.values())
            stage.status = "failed" if not ok else ("succeeded" if fresh else "cached")
            if not ok:
                log.close_pending()
                part = Path(info.log).read_text(errors="replace").rsplit(f"==> kat: task {task}\n", 1)[-1]
                stage.error = _failure_reason(part) or "see the log"
                info.error = f"{task}: {stage.error}"
            self._save(info)
            if self.on_event:
                self.on_event("end", stage)

        with human, debug, patched_env(env), contextlib.redirect_stdout(log), warnings.catch_warnings(), \
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
        atomic_write_json(out / "run.json", info.to_dict())

    def status(self, run_id: str) -> RunInfo:
        path = self._run_dir(run_id) / "run.json"
        if not re.fullmatch(r"[\w.-]+", run_id) or not path.is_file():
            raise NotFound(f"unknown run id {run_id!r} on the local back end ({self.home / 'runs'})")
        info = RunInfo.from_dict(json.loads(path.read_text()))
        if info.status == "running" and not (pid_alive(info.pid) and _began_by(info.pid, info.started_at)):
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
        info = self.status(run_id)
        if info.status not in ("running", "pending"):
            raise Conflict(f"run {run_id} is not running (it is {info.status})")
        if info.status == "running" and info.pid:
            pgid = os.getpgid(info.pid)
            if pgid == info.pid and pgid != os.getpgid(0):
                os.killpg(pgid, signal.SIGTERM)
            else:
                os.kill(info.pid, signal.SIGTERM)
        info.status, info.finished_at, info.pid = "cancelled", now_iso(), None
        self._save(info)
        _close_tracking(run_id, "cancelled")

    # -- schedules: kept by the application's schedule store (kat_app.schedules: APScheduler's job store under
    # KAT_HOME, fired by `kat serve` / `kat scheduler`), handed in as `schedules`

    def _store(self) -> ScheduleStore:
        if self.schedules is None:
            raise KatError("local schedules are kept by the application's scheduler: use `kat schedule` "
                           "(or construct LocalBackend with a schedule store)")
        return self.schedules

    def schedule(self, cron: str, profile: str, overrides: list[str] | None = None, *,
                 name: str | None = None, **options: Any) -> str:
        return self._store().create(cron, profile, list(overrides or []), name=name, **options)

    def list_schedules(self) -> list[ScheduleInfo]:
        return self._store().list_all()

    def delete_schedule(self, schedule_id: str) -> None:
        self._store().delete(schedule_id)


def _began_by(pid: int, started_at: str | None) -> bool:
    """Whether process `pid` had started by `started_at` (the run's start, which its own process records).
    A later one holds a pid the kernel reused after the run's process died unrecorded (SIGKILL, OOM): it is
    not the run, and cancel must not signal it. Linux's /proc tells; elsewhere, or without a start time, True."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        began = boot + ticks / os.sysconf("SC_CLK_TCK")
        run_began = datetime.strptime(started_at or "", "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except (OSError, ValueError, IndexError, StopIteration):
        return True
    return began <= run_began + 2  # both clocks have whole seconds here


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


def _close_tracking(run_id: str, status: str) -> None:
    """End the run's MLflow parent run (its stages opened it) with the run's outcome; no parent, nothing to do."""
    from kat_core.platform.tracking import end_pipeline_run, find_pipeline_run

    try:
        parent = find_pipeline_run(run_id)
        if parent:
            end_pipeline_run(parent, status)
    except KatError as e:  # tracking trouble must not turn a finished run into a failed one
        log.warning("could not close the MLflow run of %s: %s", run_id, e)

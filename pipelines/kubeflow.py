"""The kubeflow back end: Kubeflow Pipelines through kfp.Client (runs, and KFP recurring runs as schedules)."""

import contextlib
import io
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from kat_core.config import load_config
from kat_core.errors import Invalid, KatError, NotFound
from pipelines.cron import check_cron
from pipelines.interface import RunBackend
from pipelines.records import RunInfo, ScheduleInfo, StageInfo

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
                raise NotFound(f"{what}: not found on {self.host} ({message})") from None
            raise KatError(f"{what}: Kubeflow Pipelines answered HTTP {e.status} ({message})") from None

    def _package(self, profile: str, overrides: list[str], tmp: str) -> str:
        from pipelines.compile import compile_pipeline  # imports kfp: only when a run is packaged

        if profile.endswith((".yaml", ".yml")):  # the tasks load their profile inside the image
            raise Invalid(f"profile {profile!r} is a local file; on kubeflow use a shipped profile "
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
                 name: str | None = None, only_if_data_changed: bool = False, **_: Any) -> str:
        if only_if_data_changed:
            raise Invalid("'only if the training data changed' needs the local scheduler; "
                          "KFP recurring runs fire unconditionally")
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


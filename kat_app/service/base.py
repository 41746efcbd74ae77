"""The service's plumbing: where its state lives (KAT_HOME, MLflow, KFP), the run back ends behind one
interface, and the checks every resource shares."""

from __future__ import annotations

import os
import re
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kat_app import schedules
from kat_app.jobs import JobQueue
from kat_app.security import redact_text
from kat_core.errors import Invalid, NotFound
from kat_core.platform import kat_home
from pipelines.backends import BACKENDS
from pipelines.interface import RunBackend
from pipelines.kubeflow import KubeflowBackend
from pipelines.local import LocalBackend

RUN_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")


def _iso_to_epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None



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




class ServiceBase:
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
    def local(self) -> LocalBackend:
        return LocalBackend(home=self.home, schedules=schedules.LocalSchedules(self.home))

    def _kubeflow(self) -> KubeflowBackend:
        return KubeflowBackend(host=self.kfp_host)

    def backend(self, name: str, **options: Any) -> RunBackend:
        """The run back end `name` (every route to a run goes through one of these two); `options` go to
        the kubeflow back end (e.g. cluster=True)."""
        if name == "local":
            return self.local
        if name == "kubeflow":
            return KubeflowBackend(host=self.kfp_host, **options)
        raise Invalid(f"unknown back end {name!r}; known: {', '.join(BACKENDS)}")

    def backends(self) -> dict[str, str | None]:
        """Each back end and why it cannot be used (None: usable)."""
        return {"local": None,
                "kubeflow": None if self.kfp_host else "not configured (set KFP_HOST, and KFP_TOKEN or KFP_COOKIE)"}

    def mlflow_ui(self) -> str | None:
        """Where MLflow's own UI is, for links: KAT_MLFLOW_UI, else a tracking server's own address."""
        if self._mlflow_ui:
            return self._mlflow_ui.rstrip("/")
        uri = self.tracking_uri
        if not uri.startswith(("http://", "https://")):
            return None
        # without the URI's user:password@: links are shown to every reader; the browser asks for a login
        parts = urllib.parse.urlsplit(uri)
        return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")

    def mlflow_hint(self) -> str:
        return redact_text(f"mlflow ui --backend-store-uri {self.tracking_uri}")  # postgresql://u:***@db


    def _backend_of(self, run_id: str, backend: str | None = None) -> str:
        """The back end a run id belongs to: as given, else local ids start with `local-`."""
        if not RUN_ID.match(run_id or ""):
            raise NotFound(f"unknown run id {run_id!r}")
        if backend is not None:
            if backend not in BACKENDS:
                raise Invalid(f"unknown back end {backend!r}; known: {', '.join(BACKENDS)}")
            return backend
        return "local" if run_id.startswith("local-") else "kubeflow"

    def _model_name(self, name: str) -> str:
        if not MODEL_NAME.match(name or ""):
            raise Invalid(f"bad model name {name!r}: letters, digits, '.', '_' and '-' only")
        return name

"""Schedules: local cron schedules (the application's APScheduler store, through the local back end) and
KFP recurring runs; pause, resume, trigger; what happens when one fires."""

from __future__ import annotations

import fcntl
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kat_app import schedules
from kat_app.security import redact_overrides
from kat_app.service.base import ServiceBase
from kat_core.config import load_config
from kat_core.errors import Invalid, KatError
from kat_core.manifest import dir_digest
from kat_core.platform import artifacts
from kat_core.platform.artifacts import ArtifactStore
from kat_core.platform.registry import CHAMPION, show_version
from pipelines.backends import BACKENDS


class SchedulesService(ServiceBase):
    def list_schedules(self, backend: str | None = None) -> dict[str, Any]:
        """Local schedules (with their next fire time and last firing) and, when configured, KFP's."""
        out, warnings = [], []
        if backend in (None, "local"):
            last = self.queue.last_events()
            for s in schedules.list_all(home=self.home):  # with what only the local store knows (next fire)
                item = {**s.to_dict(), "overrides": redact_overrides(s.overrides)}
                event = last.get(s.schedule_id)
                item["last"] = None if event is None else {
                    "at": datetime.fromtimestamp(event["at"], UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
                    "trigger": event["trigger"], "run_id": event["run_id"], "outcome": event["outcome"]}
                out.append(item)
        if backend == "kubeflow" or (backend is None and self.kfp_host):
            try:
                for s in self.backend("kubeflow").list_schedules():
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
        if schedules.is_live(self.home):
            return True
        lock = self.home / "locks" / "scheduler.lock"
        if not lock.is_file():
            return False

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
        if backend not in BACKENDS:
            raise Invalid(f"unknown back end {backend!r}; choose local or kubeflow")
        name = (name or "").strip() or None
        if name and (len(name) > 100 or any(ord(c) < 32 for c in name)):  # its runs take its name: submit_run's rule
            raise Invalid("the schedule name must be at most 100 printable characters")
        overrides = self.check_config(profile, overrides)["overrides"]
        if backend == "kubeflow" and only_if_data_changed:  # before reaching for KFP: a request it cannot take
            raise Invalid("'only if the training data changed' needs the local scheduler; "
                          "KFP recurring runs fire unconditionally")
        options = {"only_if_data_changed": only_if_data_changed, "who": who} if backend == "local" else {}
        schedule_id = self.backend(backend).schedule(cron, profile, overrides, name=name, **options)
        if backend == "kubeflow":
            return {"schedule_id": schedule_id, "backend": "kubeflow", "cron": cron, "profile": profile,
                    "overrides": redact_overrides(overrides), "name": name}
        created = schedules.get(schedule_id, home=self.home)
        return {**created.to_dict(), "overrides": redact_overrides(created.overrides)}

    def _local_schedule(self, schedule_id: str, action):
        return action(schedule_id, home=self.home)

    def get_schedule(self, schedule_id: str) -> dict[str, Any]:
        found = self._local_schedule(schedule_id, schedules.get)
        item = {**found.to_dict(), "overrides": redact_overrides(found.overrides)}
        item["events"] = [{**e, "at": datetime.fromtimestamp(e["at"], UTC).strftime("%Y-%m-%d %H:%M:%SZ")}
                          for e in self.queue.events(schedule_id, 20)]
        return item

    def pause_schedule(self, schedule_id: str) -> dict[str, Any]:
        self._require_local_schedule(schedule_id)
        found = self._local_schedule(schedule_id, schedules.pause)
        return {**found.to_dict(), "overrides": redact_overrides(found.overrides)}

    def resume_schedule(self, schedule_id: str) -> dict[str, Any]:
        self._require_local_schedule(schedule_id)
        found = self._local_schedule(schedule_id, schedules.resume)
        return {**found.to_dict(), "overrides": redact_overrides(found.overrides)}

    def trigger_schedule(self, schedule_id: str) -> dict[str, Any]:
        self._require_local_schedule(schedule_id)
        self._local_schedule(schedule_id, schedules.trigger)
        return {"schedule_id": schedule_id, "triggered": True, "scheduler_running": self._scheduler_running()}

    def delete_schedule(self, schedule_id: str, backend: str | None = None) -> None:
        if backend is None:
            backend = "local" if schedule_id.startswith("sched-") else "kubeflow"
        self.backend(backend).delete_schedule(schedule_id)

    @staticmethod
    def _require_local_schedule(schedule_id: str) -> None:
        if not schedule_id.startswith("sched-"):
            # local ids are `sched-...`; anything else is a KFP recurring run's id, or no schedule at all
            raise Invalid(f"no local schedule {schedule_id!r} (local ids start with 'sched-'; `kat schedule list` "
                          "shows them); pause, resume and trigger KFP recurring runs in the Kubeflow Pipelines UI")

    def data_changed_since_champion(self, profile: str, overrides: list[str]) -> tuple[bool, str]:
        """Whether the training data a run of this config would train on differs from the champion's: the digest
        of the dataset this config's recipe makes, looked up in the artifact store (synthesized and stored
        there first when it never was: seeded, the same recipe gives the same data), compared with the digest
        registered with the champion (`kat.data.synthesize`)."""
        config = load_config(profile, overrides)
        name = config.registry.model_name
        try:
            champion = show_version(name, CHAMPION, tracking_uri=self.tracking_uri)
        except KatError:
            return True, f"{name} has no champion yet"
        recorded = champion["data"].get("synthesize")
        if not recorded:
            return True, f"champion v{champion['version']} records no training-data digest"
        store = ArtifactStore.from_env(self.home)
        digest = store.dataset_digest(config)
        if digest is None:  # never made here: make it now (the run this firing starts then fetches it)
            scratch = self.home / "tmp"
            scratch.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=scratch) as tmp:
                artifacts.dataset(config, Path(tmp) / "data", store=store)
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


"""The interface every run back end implements (`local`: kfp.local here; `kubeflow`: kfp.Client), and the
schedule store the local back end keeps its cron schedules in (the application provides it: the scheduler
that fires them lives above the pipelines)."""

from abc import ABC, abstractmethod
from typing import Any, Protocol

from pipelines.records import RunInfo, ScheduleInfo


class ScheduleStore(Protocol):
    """Where the local back end's schedules live (kat_app.schedules.LocalSchedules: APScheduler's store)."""

    def create(self, cron: str, profile: str, overrides: list[str], *, name: str | None = None,
               **options: Any) -> str: ...

    def list_all(self) -> list[ScheduleInfo]: ...

    def delete(self, schedule_id: str) -> None: ...


class RunBackend(ABC):
    """Start, watch, cancel and schedule AutoThink pipeline runs somewhere."""

    name: str

    @abstractmethod
    def submit(self, profile: str, overrides: list[str] | None = None, *, name: str | None = None) -> str:
        """Start a run of the pipeline on `profile`; returns its run id."""

    @abstractmethod
    def status(self, run_id: str) -> RunInfo:
        """The run's record; `NotFound` for an id this back end does not know."""

    @abstractmethod
    def list_runs(self, limit: int = 20) -> list[RunInfo]:
        """The newest runs first."""

    @abstractmethod
    def cancel(self, run_id: str) -> None: ...

    @abstractmethod
    def schedule(self, cron: str, profile: str, overrides: list[str] | None = None, *,
                 name: str | None = None, **options: Any) -> str:
        """Run the pipeline on `profile` at the times of a 5-field cron expression; returns the schedule id.
        `options` are back-end specific (local: only_if_data_changed, who)."""

    @abstractmethod
    def list_schedules(self) -> list[ScheduleInfo]: ...

    @abstractmethod
    def delete_schedule(self, schedule_id: str) -> None: ...

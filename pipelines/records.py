"""What the run back ends report: a run (`RunInfo`) with its stages (`StageInfo`), and a schedule
(`ScheduleInfo`). Plain dataclasses, JSON-friendly (a local run's `run.json` is `RunInfo.to_dict()`)."""

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any


def now_iso() -> str:
    """Now, UTC, as the records write times: 2026-01-31T12:00:00Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class StageInfo:
    name: str
    status: str  # running | succeeded | cached | failed (kubeflow: its task state, lower case)
    seconds: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # output name -> URI (a local path on `local`)
    error: str | None = None
    progress: str | None = None  # a training stage's last step line: step/total, loss, elapsed, ETA


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


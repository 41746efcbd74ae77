"""The queue of local runs and the worker that executes them, outside any web request.

A run submitted to the local back end is prepared (its `runs/<id>/run.json` says `pending`) and queued in
a small SQLite table, `$KAT_HOME/dashboard.db`. The worker thread of `kat serve` (or `kat scheduler`)
starts queued runs, oldest first and at most `concurrency` at a time, each in a process of its own
(`python -m pipelines.worker RUN_ID`, in a new session, so cancelling it stops its whole process group),
and notes when each ends. The same database records every firing of a schedule.

State survives a restart of the service: run records live in run.json (and MLflow), queued runs stay
queued, and a run whose process outlived the service is adopted by the next one (watched by its pid).
Several processes may share KAT_HOME: claiming a queued run is one transaction, so each runs once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kat_core.errors import Invalid
from kat_core.util import pid_alive

log = logging.getLogger(__name__)

DB_FILE = "dashboard.db"
QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    run_id TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    state TEXT NOT NULL,
    pid INTEGER,
    schedule_id TEXT,
    who TEXT,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, submitted_at);
CREATE INDEX IF NOT EXISTS jobs_schedule ON jobs(schedule_id, submitted_at);
CREATE TABLE IF NOT EXISTS schedule_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    schedule_id TEXT NOT NULL,
    at REAL NOT NULL,
    trigger TEXT NOT NULL,
    run_id TEXT,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_schedule ON schedule_events(schedule_id, at);
"""


class JobQueue:
    """The `jobs` and `schedule_events` tables; one short connection per call (threads and processes)."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.path = self.home / DB_FILE
        self.home.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _db(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            if immediate:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            else:
                yield db
        finally:
            db.close()

    # -- jobs

    def add(self, run_id: str, backend: str, *, state: str = QUEUED, schedule_id: str | None = None,
            who: str | None = None) -> None:
        with self._db() as db:
            db.execute("INSERT INTO jobs (run_id, backend, state, schedule_id, who, submitted_at) VALUES (?,?,?,?,?,?)",
                       (run_id, backend, state, schedule_id, who, time.time()))

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE run_id = ?", (run_id,)).fetchone()
        return dict(row) if row else None

    def all(self) -> dict[str, dict[str, Any]]:
        with self._db() as db:
            return {r["run_id"]: dict(r) for r in db.execute("SELECT * FROM jobs")}

    def with_state(self, state: str) -> list[dict[str, Any]]:
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY submitted_at", (state,))]

    def claim_next(self) -> dict[str, Any] | None:
        """The oldest queued local run, marked running (atomically: one claimant wins)."""
        with self._db(immediate=True) as db:
            row = db.execute("SELECT * FROM jobs WHERE state = ? AND backend = 'local' ORDER BY submitted_at LIMIT 1",
                             (QUEUED,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = ?, started_at = ? WHERE run_id = ?", (RUNNING, time.time(),
                                                                                      row["run_id"]))
        return dict(row)

    def requeue(self, run_id: str) -> None:
        with self._db() as db:
            db.execute("UPDATE jobs SET state = ?, pid = NULL, started_at = NULL WHERE run_id = ?", (QUEUED, run_id))

    def set_pid(self, run_id: str, pid: int) -> None:
        with self._db() as db:
            db.execute("UPDATE jobs SET pid = ? WHERE run_id = ?", (pid, run_id))

    def finish(self, run_id: str, state: str = DONE) -> None:
        with self._db() as db:
            db.execute("UPDATE jobs SET state = ?, finished_at = ? WHERE run_id = ? AND state IN (?, ?)",
                       (state, time.time(), run_id, QUEUED, RUNNING))

    def cancel_queued(self, run_id: str) -> bool:
        """Take a run out of the queue before it starts; False when it is no longer queued."""
        with self._db() as db:
            cur = db.execute("UPDATE jobs SET state = ?, finished_at = ? WHERE run_id = ? AND state = ?",
                             (CANCELLED, time.time(), run_id, QUEUED))
            return cur.rowcount == 1

    def position(self, run_id: str) -> int | None:
        """1 for the next run to start, None when the run is not queued."""
        with self._db() as db:
            row = db.execute("SELECT submitted_at FROM jobs WHERE run_id = ? AND state = ?",
                             (run_id, QUEUED)).fetchone()
            if row is None:
                return None
            return db.execute("SELECT COUNT(*) FROM jobs WHERE state = ? AND submitted_at <= ?",
                              (QUEUED, row["submitted_at"])).fetchone()[0]

    # -- schedule firings

    def add_event(self, schedule_id: str, trigger: str, outcome: str, run_id: str | None = None) -> None:
        with self._db() as db:
            db.execute("INSERT INTO schedule_events (schedule_id, at, trigger, run_id, outcome) VALUES (?,?,?,?,?)",
                       (schedule_id, time.time(), trigger, run_id, outcome))

    def events(self, schedule_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        with self._db() as db:
            if schedule_id is None:
                rows = db.execute("SELECT * FROM schedule_events ORDER BY id DESC LIMIT ?", (limit,))
            else:
                rows = db.execute("SELECT * FROM schedule_events WHERE schedule_id = ? ORDER BY id DESC LIMIT ?",
                                  (schedule_id, limit))
            return [dict(r) for r in rows]

    def last_events(self) -> dict[str, dict[str, Any]]:
        """The latest firing of every schedule."""
        with self._db() as db:
            rows = db.execute("SELECT e.* FROM schedule_events e JOIN (SELECT schedule_id, MAX(id) AS id FROM "
                              "schedule_events GROUP BY schedule_id) m ON e.id = m.id")
            return {r["schedule_id"]: dict(r) for r in rows}


class RunWorker(threading.Thread):
    """Starts queued local runs in processes of their own, at most `concurrency` at a time, and notes when
    they end. A daemon thread: stopping the service leaves running runs running (the next service adopts
    them)."""

    def __init__(self, home: Path, concurrency: int = 1, poll_s: float = 0.5):
        super().__init__(name="kat-run-worker", daemon=True)
        if concurrency < 1:
            raise Invalid(f"concurrency must be at least 1, got {concurrency}")
        self.home = Path(home)
        self.queue = JobQueue(self.home)
        self.concurrency = concurrency
        self.poll_s = poll_s
        self.procs: dict[str, subprocess.Popen] = {}
        self._stop_event = threading.Event()
        self._wake = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self._wake.set()

    def wake(self) -> None:
        """Look at the queue now (a run was just submitted)."""
        self._wake.set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.tick()
            except Exception:  # the worker must outlive a bad row or a full disk
                log.exception("run worker: tick failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def tick(self) -> None:
        running = self._reap()
        while running < self.concurrency and not self._stop_event.is_set():
            job = self.queue.claim_next()
            if job is None:
                break
            if self._start(job["run_id"]):
                running += 1

    def _record_status(self, run_id: str) -> str | None:
        path = self.home / "runs" / run_id / "run.json"
        try:
            return json.loads(path.read_text()).get("status")
        except (OSError, ValueError):
            return None

    def _start(self, run_id: str) -> bool:
        if self._record_status(run_id) != "pending":  # cancelled (or removed) while it waited
            self.queue.finish(run_id, CANCELLED)
            return False
        run_dir = self.home / "runs" / run_id
        env = {**os.environ, "KAT_HOME": str(self.home.resolve())}
        with open(run_dir / "worker.log", "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pipelines.worker", run_id], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        self.procs[run_id] = proc
        self.queue.set_pid(run_id, proc.pid)
        log.info("run %s started (pid %d)", run_id, proc.pid)
        return True

    def _reap(self) -> int:
        """Note runs that ended; return how many are still running (ours and adopted ones)."""
        for run_id, proc in list(self.procs.items()):
            if proc.poll() is not None:
                del self.procs[run_id]
                self.queue.finish(run_id)
        running = len(self.procs)
        for job in self.queue.with_state(RUNNING):
            if job["run_id"] in self.procs or job["backend"] != "local":
                continue
            if pid_alive(job["pid"]):
                running += 1  # started by an earlier service (or another one sharing KAT_HOME)
            elif job["pid"] is None and self._record_status(job["run_id"]) == "pending" \
                    and time.time() - (job["started_at"] or 0) > 30:
                self.queue.requeue(job["run_id"])  # claimed, but its claimant died before starting it
            elif job["pid"] is not None:
                self.queue.finish(job["run_id"])
        return running

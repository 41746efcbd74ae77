"""Cron schedules for retraining on the local back end: APScheduler 3, its SQLAlchemy job store in
`$KAT_HOME/scheduler.db`.

One APScheduler job per schedule, its id the schedule id, its trigger the cron expression, its kwargs the
schedule (profile, overrides, "only if the training data changed since the champion", who made it). When
it fires, `fire` hands it to the service layer (`Service.fire_schedule`), which submits a run like any
other (the run's register stage promotes only through the gate) and records the firing.

Who fires: the process running `kat serve` or `kat scheduler` (`start_live`); one per KAT_HOME, held by a
lock. Others (the CLI) open the store with a paused scheduler, change it and close it; the live scheduler
sees their changes within `HEARTBEAT_S` (an in-memory heartbeat job wakes it to re-read the store).

Cron meaning: the classic 5 fields, checked by `pipelines.cron.check_cron`. APScheduler numbers the
days of the week from Monday = 0 where cron has Sunday = 0, so the weekday field is translated to names;
and where cron fires when *either* day field matches, APScheduler wants both, so a schedule restricting
both the day of the month and the day of the week is refused rather than run on other days.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kat_core.config import load_config
from kat_core.errors import Invalid, KatError, NotFound
from kat_core.platform import kat_home
from pipelines.cron import check_cron
from pipelines.records import ScheduleInfo

log = logging.getLogger(__name__)

STORE_FILE = "scheduler.db"
LEGACY_FILE = "schedules.json"
FIRE = "kat_app.firing:fire"
MOVED_FIRE = ("kat_core.platform.schedules:fire",)  # where earlier versions had it; stored jobs still name it
HEARTBEAT_S = 10
MANUAL_MARK = "--now-"  # one-off "trigger now" jobs: <schedule id>--now-<hex>

_WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_live: dict[str, Any] = {}  # home -> the scheduler this process runs (start_live)
_live_lock = threading.Lock()


@dataclass
class Schedule:
    schedule_id: str
    cron: str
    profile: str
    overrides: list[str] = field(default_factory=list)
    name: str | None = None
    backend: str = "local"
    only_if_data_changed: bool = False
    paused: bool = False
    next_fire: str | None = None  # ISO time with zone; None when paused
    created_at: str | None = None
    who: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _home(home: str | Path | None) -> Path:
    return Path(home).resolve() if home is not None else kat_home()


def weekday_names(field_text: str) -> str:
    """A cron day-of-week field (0 or 7 = Sunday, names, ranges, steps, lists) as APScheduler names."""
    days: set[int] = set()
    for item in field_text.split(","):
        base, _, step = item.partition("/")
        stride = int(step) if step else 1
        if base == "*":
            lo, hi = 0, 6
        else:
            first, _, last = base.partition("-")
            lo = _day(first, end=bool(last))  # a range from 7 is Sunday alone ("7-7"), not 0 to 7
            hi = _day(last, end=True) if last else (6 if step else lo)
        days.update(d % 7 for d in range(lo, hi + 1, stride))
    if days == set(range(7)):
        return "*"
    return ",".join(_WEEKDAYS[d] for d in sorted(days))


def _day(text: str, end: bool = False) -> int:
    text = text.lower()
    if text in _WEEKDAYS:
        return _WEEKDAYS.index(text)
    value = int(text)
    return 7 if end and value == 7 else value % 7


def cron_trigger(cron: str, timezone: Any = None):
    """The APScheduler CronTrigger of a checked 5-field cron expression (see the module docstring)."""
    from apscheduler.triggers.cron import CronTrigger

    minute, hour, dom, month, dow = check_cron(cron).split()
    if dom != "*" and dow != "*":
        raise Invalid(f"cron {cron!r} restricts both the day of the month and the day of the week; the local "
                       "scheduler cannot fire on either one (cron's rule), so restrict only one of them")
    try:
        return CronTrigger(minute=minute, hour=hour, day=dom, month=month, day_of_week=weekday_names(dow),
                           timezone=timezone)
    except ValueError as e:  # what check_cron lets through and APScheduler does not: a step past the range, */61
        raise Invalid(f"bad cron {cron!r}: {e}") from None


def _require_a_fire_time(cron: str, trigger: Any) -> None:
    """Refuse a cron that matches no date (`0 0 30 2 *`): APScheduler would store it with no fire time, shown as
    paused, and on resume it deletes the job."""
    if trigger.get_next_fire_time(None, datetime.now(trigger.timezone)) is None:
        raise Invalid(f"cron {cron!r} never fires: no date matches it")


def next_fire_times(cron: str, n: int = 3) -> list[str]:
    """The next `n` fire times of `cron` from now (local time), for a form to preview."""
    from tzlocal import get_localzone

    zone = get_localzone()
    trigger = cron_trigger(cron, zone)
    out, previous, now = [], None, datetime.now(zone)
    for _ in range(n):
        nxt = trigger.get_next_fire_time(previous, now)
        if nxt is None:
            break
        out.append(nxt.isoformat(timespec="minutes"))
        previous, now = nxt, nxt
    return out


def _new_scheduler(home: Path, live: bool = True):
    """A BackgroundScheduler (live: it fires jobs) or a scheduler with no thread at all, to edit the store
    from another process (a stopped BackgroundScheduler's thread would still process due jobs once)."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.base import BaseScheduler

    class StoreEditor(BaseScheduler):
        def wakeup(self) -> None:
            pass  # never fires anything

        def shutdown(self, wait: bool = True) -> None:
            super().shutdown(wait)

    logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)  # "Running job ..." per beat
    logging.getLogger("apscheduler.scheduler").setLevel(logging.WARNING)
    return (BackgroundScheduler if live else StoreEditor)(
        jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{home / STORE_FILE}"), "memory": MemoryJobStore()},
        executors={"default": ThreadPoolExecutor(2)},
        # a missed firing (the service was down) runs once when it is back, within the hour
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
    )


def _start(home: Path, live: bool) -> Any:
    """A scheduler over the store, started paused. Two processes opening a new store at once both try to
    create its table (SQLAlchemy checks, then creates): the one that loses sees it exists, and tries again."""
    from sqlalchemy.exc import OperationalError

    _repoint_moved_jobs(home / STORE_FILE)
    for attempt in range(3):
        scheduler = _new_scheduler(home, live=live)
        try:
            scheduler.start(paused=True)
            return scheduler
        except OperationalError as e:
            if "already exists" not in str(e.orig) or attempt == 2:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def _repoint_moved_jobs(store: Path) -> int:
    """Point stored jobs whose function moved (MOVED_FIRE) at FIRE; returns how many. Without this APScheduler
    cannot resolve them when it loads the store, and drops them: the schedules would vanish."""
    import pickle
    import sqlite3

    if not store.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(store, timeout=30)) as db, db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='apscheduler_jobs'").fetchone():
            return 0
        moved = []
        for job_id, blob in db.execute("SELECT id, job_state FROM apscheduler_jobs").fetchall():
            state = pickle.loads(blob)  # our own store, written by APScheduler's pickling of the same state
            if state.get("func") in MOVED_FIRE:
                state["func"] = FIRE
                moved.append((pickle.dumps(state, pickle.HIGHEST_PROTOCOL), job_id))
        db.executemany("UPDATE apscheduler_jobs SET job_state = ? WHERE id = ?", moved)
    if moved:
        log.info("schedules: %d stored job(s) now call %s (moved from %s)", len(moved), FIRE, MOVED_FIRE[0])
    return len(moved)


@contextlib.contextmanager
def _scheduler(home: Path) -> Iterator[Any]:
    """The live scheduler of this process for `home`, else a paused one over the same store."""
    live = _live.get(str(home))
    if live is not None:
        yield live["scheduler"]
        return
    scheduler = _start(home, live=False)
    try:
        _migrate(scheduler, home)
        yield scheduler
    finally:
        scheduler.shutdown(wait=False)


def _migrate(scheduler: Any, home: Path) -> None:
    """Move the schedules of `schedules.json` (earlier versions kept them there) into the job store."""
    legacy = home / LEGACY_FILE
    if not legacy.is_file():
        return
    try:
        entries = json.loads(legacy.read_text())
    except ValueError:
        log.warning("%s is not JSON; left where it is", legacy)
        return
    for e in entries:
        if scheduler.get_job(e["schedule_id"]) is not None or e.get("backend", "local") != "local":
            continue
        _add(scheduler, Schedule(schedule_id=e["schedule_id"], cron=e["cron"], profile=e.get("profile") or "demo",
                                 overrides=list(e.get("overrides") or []), name=e.get("name"),
                                 created_at=e.get("created_at")), home, paused=not e.get("enabled", True))
    os.replace(legacy, legacy.with_name(LEGACY_FILE + ".migrated"))
    log.info("moved %d schedule(s) from %s into %s", len(entries), legacy, home / STORE_FILE)


def _retrigger(scheduler: Any) -> None:
    """Give each stored schedule the trigger its cron means today. A stored job keeps the trigger it was made
    with, so one made before a translation was fixed (e.g. weekday "7-7", read as every day) would go on
    firing on the wrong days; a cron now refused (it never fires, or restricts both day fields) is paused."""
    for job in scheduler.get_jobs(jobstore="default"):
        cron = (job.kwargs or {}).get("cron")
        if MANUAL_MARK in job.id or not cron:
            continue
        try:
            trigger = cron_trigger(cron, job.trigger.timezone)
            _require_a_fire_time(cron, trigger)
        except Invalid as e:
            if job.next_run_time is not None:
                job.pause()
                log.warning("schedule %s paused: %s", job.id, e)
            continue
        before = str(job.trigger)
        if str(trigger) == before:
            continue
        if job.next_run_time is None:  # paused: stays paused, with the right days for when it resumes
            job.modify(trigger=trigger)
        else:
            job.reschedule(trigger)
        log.info("schedule %s: trigger %s -> %s (cron %r)", job.id, before, trigger, cron)


def _kwargs(s: Schedule, home: Path) -> dict[str, Any]:
    return {"schedule_id": s.schedule_id, "home": str(home), "cron": s.cron, "profile": s.profile,
            "overrides": list(s.overrides), "name": s.name, "only_if_data_changed": s.only_if_data_changed,
            "created_at": s.created_at, "who": s.who}


def _add(scheduler: Any, s: Schedule, home: Path, paused: bool = False) -> None:
    job = scheduler.add_job(FIRE, cron_trigger(s.cron), id=s.schedule_id, name=s.name or s.schedule_id,
                            kwargs=_kwargs(s, home), replace_existing=False)
    if paused:
        job.pause()


def _from_job(job: Any) -> Schedule:
    k = job.kwargs
    return Schedule(schedule_id=job.id, cron=k["cron"], profile=k["profile"], overrides=list(k.get("overrides") or []),
                    name=k.get("name"), only_if_data_changed=bool(k.get("only_if_data_changed")),
                    paused=job.next_run_time is None,
                    next_fire=job.next_run_time.isoformat(timespec="seconds") if job.next_run_time else None,
                    created_at=k.get("created_at"), who=k.get("who"))


def create(cron: str, profile: str, overrides: list[str] | None = None, *, name: str | None = None,
           only_if_data_changed: bool = False, who: str | None = None, home: str | Path | None = None) -> Schedule:
    """Add a schedule (after checking its cron and its config: a schedule that could never run is refused)."""
    cron = check_cron(cron)
    _require_a_fire_time(cron, cron_trigger(cron))
    load_config(profile, list(overrides or []))
    home = _home(home)
    s = Schedule(schedule_id=f"sched-{secrets.token_hex(4)}", cron=cron, profile=profile,
                 overrides=list(overrides or []), name=name or None, only_if_data_changed=only_if_data_changed,
                 created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), who=who)
    with _scheduler(home) as scheduler:
        _add(scheduler, s, home)
        return _from_job(scheduler.get_job(s.schedule_id))


def list_all(home: str | Path | None = None) -> list[Schedule]:
    with _scheduler(_home(home)) as scheduler:
        jobs = scheduler.get_jobs(jobstore="default")
    return sorted((_from_job(j) for j in jobs if MANUAL_MARK not in j.id), key=lambda s: s.created_at or "")


def get(schedule_id: str, home: str | Path | None = None) -> Schedule:
    with _scheduler(_home(home)) as scheduler:
        return _from_job(_job(scheduler, schedule_id))


def _job(scheduler: Any, schedule_id: str) -> Any:
    job = scheduler.get_job(schedule_id, jobstore="default") if MANUAL_MARK not in schedule_id else None
    if job is None:
        raise NotFound(f"unknown schedule id {schedule_id!r} on the local back end")
    return job


def pause(schedule_id: str, home: str | Path | None = None) -> Schedule:
    with _scheduler(_home(home)) as scheduler:
        _job(scheduler, schedule_id).pause()
        return _from_job(scheduler.get_job(schedule_id))


def resume(schedule_id: str, home: str | Path | None = None) -> Schedule:
    with _scheduler(_home(home)) as scheduler:
        job = _job(scheduler, schedule_id)
        _require_a_fire_time(job.kwargs["cron"], job.trigger)  # one stored before create checked this
        job.resume()
        return _from_job(scheduler.get_job(schedule_id))


def delete(schedule_id: str, home: str | Path | None = None) -> None:
    with _scheduler(_home(home)) as scheduler:
        _job(scheduler, schedule_id).remove()
        for job in scheduler.get_jobs(jobstore="default"):  # a "trigger now" not yet fired goes with it
            if job.id.startswith(schedule_id + MANUAL_MARK):
                job.remove()


def trigger(schedule_id: str, home: str | Path | None = None) -> None:
    """Fire a schedule once, now (a one-off job beside it; a paused schedule stays paused). The live
    scheduler runs it at once, or within a heartbeat when it lives in another process."""
    home = _home(home)
    with _scheduler(home) as scheduler:
        job = _job(scheduler, schedule_id)
        scheduler.add_job(FIRE, "date", id=f"{schedule_id}{MANUAL_MARK}{secrets.token_hex(3)}",
                          name=f"{job.name} (now)", kwargs={**job.kwargs, "trigger": "manual"},
                          misfire_grace_time=None)


def _heartbeat() -> None:
    """Nothing: its only purpose is to wake the scheduler, which then re-reads the job store."""


def start_live(home: str | Path | None = None) -> Any:
    """Run the scheduler for `home` in this process (background thread); returns it. A second live
    scheduler on the same KAT_HOME (another `kat serve` or `kat scheduler`) is refused: both would fire."""
    home = _home(home)
    with _live_lock:
        if str(home) in _live:
            return _live[str(home)]["scheduler"]
        locks = home / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        handle = open(locks / "scheduler.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise KatError(f"a scheduler already runs for {home} ({holder}); schedules fire there") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        scheduler = _start(home, live=True)
        _migrate(scheduler, home)
        _retrigger(scheduler)
        scheduler.add_job(_heartbeat, "interval", seconds=HEARTBEAT_S, id="kat-heartbeat", jobstore="memory")
        scheduler.resume()
        _live[str(home)] = {"scheduler": scheduler, "lock": handle}
        log.info("scheduler running for %s (%s)", home, home / STORE_FILE)
        return scheduler


def stop_live(home: str | Path | None = None) -> None:
    home = _home(home)
    with _live_lock:
        live = _live.pop(str(home), None)
    if live is None:
        return
    live["scheduler"].shutdown(wait=False)
    fcntl.flock(live["lock"], fcntl.LOCK_UN)
    live["lock"].close()


def is_live(home: str | Path | None = None) -> bool:
    return str(_home(home)) in _live


class LocalSchedules:
    """The local back end's schedule store (`pipelines.interface.ScheduleStore`) over this module."""

    def __init__(self, home: str | Path | None = None):
        self.home = _home(home)

    def create(self, cron: str, profile: str, overrides: list[str], *, name: str | None = None,
               only_if_data_changed: bool = False, who: str | None = None) -> str:
        return create(cron, profile, overrides, name=name, only_if_data_changed=only_if_data_changed, who=who,
                      home=self.home).schedule_id

    def list_all(self) -> list[ScheduleInfo]:
        return [ScheduleInfo(schedule_id=s.schedule_id, backend="local", cron=s.cron, profile=s.profile,
                             overrides=s.overrides, name=s.name, enabled=not s.paused, created_at=s.created_at)
                for s in list_all(home=self.home)]

    def delete(self, schedule_id: str) -> None:
        delete(schedule_id, home=self.home)

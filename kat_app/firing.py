"""What a local schedule's job does when it fires: APScheduler calls `fire` (by its name,
`kat_app.schedules.FIRE`) in the live scheduler's process; the service submits the run."""

import logging
from typing import Any

from kat_app.service import Service

log = logging.getLogger(__name__)


def fire(schedule_id: str, home: str, trigger: str = "cron", **schedule: Any) -> None:
    """What a schedule's job does when it fires (called by APScheduler in the live scheduler's process)."""
    try:
        Service(home=home).fire_schedule(schedule_id, trigger=trigger, **schedule)
    except Exception:  # APScheduler would log it anyway; say which schedule
        log.exception("schedule %s: firing failed", schedule_id)



"""Maintenance windows from cron expressions (APScheduler 3.x triggers)."""

from __future__ import annotations

from datetime import datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

from controller.rollouts.plan import Window


def in_window(windows: list[Window], now: datetime) -> bool:
    """True when ``now`` falls inside one of ``windows`` (no windows: always)."""
    if not windows:
        return True
    for window in windows:
        trigger = CronTrigger.from_crontab(window.cron, timezone=window.timezone)
        start = now - timedelta(seconds=window.duration_s)
        fire = trigger.get_next_fire_time(None, start)
        if fire is not None and fire <= now:
            return True
    return False


def next_opening(windows: list[Window], now: datetime) -> datetime | None:
    """When the next window opens (None without windows)."""
    times = [
        t for w in windows if (t := CronTrigger.from_crontab(w.cron, timezone=w.timezone).get_next_fire_time(None, now))
    ]
    return min(times) if times else None

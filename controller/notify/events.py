"""The events webhooks can receive, their JSON bodies, and matching a webhook's event patterns."""

from __future__ import annotations

import fnmatch
import json
import re
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from controller.db.types import utcnow


class EventType(StrEnum):
    ROLLOUT_PAUSED = "rollout.paused"
    ROLLOUT_AWAITING_APPROVAL = "rollout.awaiting_approval"
    ROLLOUT_WAITING_WINDOW = "rollout.waiting_window"
    ROLLOUT_ABORTING = "rollout.aborting"
    ROLLOUT_ABORTED = "rollout.aborted"
    ROLLOUT_COMPLETED = "rollout.completed"
    DEPLOYMENT_FAILED = "deployment.failed"
    DEVICE_OFFLINE = "device.offline"
    DEVICE_ONLINE = "device.online"
    PING = "ping"


#: what each event means (the API's and the README's list)
DESCRIPTIONS: dict[EventType, str] = {
    EventType.ROLLOUT_PAUSED: "a rollout paused (by an operator, or a wave below its success threshold)",
    EventType.ROLLOUT_AWAITING_APPROVAL: "a rollout waits for an operator to approve its next wave",
    EventType.ROLLOUT_WAITING_WINDOW: "a rollout's next wave waits for a maintenance window (when it opens)",
    EventType.ROLLOUT_ABORTING: "a rollout was aborted (failures, a gate, an operator): its devices are going back",
    EventType.ROLLOUT_ABORTED: "every device an aborted rollout touched is back on its previous model",
    EventType.ROLLOUT_COMPLETED: "a rollout finished its last wave",
    EventType.DEPLOYMENT_FAILED: "a deployment ended with devices that failed or were rolled back",
    EventType.DEVICE_OFFLINE: "devices offline longer than notify_offline_after_s (one event lists them all)",
    EventType.DEVICE_ONLINE: "devices reported offline by a device.offline event are back",
    EventType.PING: "a test event sent with 'slmfleet webhooks test' or the dashboard's Send test button",
}
#: rollout states that are told about, and as which event
ROLLOUT_EVENTS: dict[str, EventType] = {
    "paused": EventType.ROLLOUT_PAUSED,
    "awaiting_approval": EventType.ROLLOUT_AWAITING_APPROVAL,
    "waiting_window": EventType.ROLLOUT_WAITING_WINDOW,
    "aborting": EventType.ROLLOUT_ABORTING,
    "aborted": EventType.ROLLOUT_ABORTED,
    "completed": EventType.ROLLOUT_COMPLETED,
}
ALL = "*"
#: the patterns the API's schema describes: every event, every family with ``.*``, and ``*`` (the parser also
#: takes other shell-style wildcards, as long as they match an event)
SCHEMA_PATTERN = (
    "^("
    + "|".join(
        [re.escape(t.value) for t in EventType]
        + [re.escape(f) + r"\.\*" for f in sorted({t.value.split(".")[0] for t in EventType if "." in t.value})]
        + [r"\*"]
    )
    + ")$"
)


def check_patterns(patterns: list[str]) -> list[str]:
    """Deduplicated patterns; ValueError naming one that matches no event (a typo would never fire)."""
    out: list[str] = []
    for raw in patterns:
        pattern = raw.strip()
        if not pattern:
            continue
        if not any(fnmatch.fnmatchcase(t.value, pattern) for t in EventType):
            known = ", ".join(t.value for t in EventType)
            raise ValueError(f"{pattern!r} matches no event; events are: {known} (wildcards: rollout.*, *)")
        if pattern not in out:
            out.append(pattern)
    return out or [ALL]


def matches(patterns: list[str], event_type: str) -> bool:
    return any(fnmatch.fnmatchcase(event_type, p) for p in patterns)


def new_id() -> str:
    """A message id (the ``webhook-id`` header; the same on every retry, so receivers can drop repeats)."""
    return f"msg_{uuid.uuid4().hex}"


def iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat().replace("+00:00", "Z")


def body(event_id: str, event_type: str, data: dict[str, Any], at: datetime | None = None) -> str:
    """The JSON body, serialized once: the exact bytes every attempt sends and signs."""
    return json.dumps(
        {"id": event_id, "type": event_type, "timestamp": iso(at or utcnow()), "data": data},
        separators=(",", ":"),
        sort_keys=True,
        default=str,
    )

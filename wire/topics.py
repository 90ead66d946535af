"""Topic names: built and matched here and nowhere else.

The device id sits in the topic so a broker ACL can scope a device to its own
subtree (``%u``/``%c`` patterns). Ids are restricted to characters that are
never MQTT wildcards or separators.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

ROOT = "slmfleet/v1"
DEVICE_PREFIX = f"{ROOT}/dev"
ARTIFACT_PREFIX = f"{ROOT}/art"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class DeviceChannel(StrEnum):
    """The per-device subtopics."""

    STATE = "state"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    CMD = "cmd"
    RESULTS = "results"
    CHUNKS = "chunks"


def is_valid_id(value: str) -> bool:
    """True when ``value`` can be used as a device or artifact id inside a topic."""
    return bool(_ID_RE.match(value))


def check_id(value: str, what: str = "device id") -> str:
    """Return ``value`` or raise ValueError saying what a valid id looks like."""
    if not is_valid_id(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-128 characters from A-Z a-z 0-9 . _ : -, starting with a letter or digit"
        )
    return value


def device(device_id: str, channel: DeviceChannel) -> str:
    """Topic of one device channel, e.g. ``slmfleet/v1/dev/pump-7/state``."""
    return f"{DEVICE_PREFIX}/{check_id(device_id)}/{channel.value}"


def state(device_id: str) -> str:
    return device(device_id, DeviceChannel.STATE)


def telemetry(device_id: str) -> str:
    return device(device_id, DeviceChannel.TELEMETRY)


def events(device_id: str) -> str:
    return device(device_id, DeviceChannel.EVENTS)


def cmd(device_id: str) -> str:
    return device(device_id, DeviceChannel.CMD)


def results(device_id: str) -> str:
    return device(device_id, DeviceChannel.RESULTS)


def chunks(device_id: str) -> str:
    """Chunks repaired for one device alone (it asked for them)."""
    return device(device_id, DeviceChannel.CHUNKS)


def artifact_chunks(artifact_id: str) -> str:
    """Chunks of an artifact broadcast to every device that downloads it."""
    if len(artifact_id) != 64 or any(c not in "0123456789abcdef" for c in artifact_id):
        raise ValueError(f"invalid artifact id {artifact_id!r}: a sha256 in lower-case hex")
    return f"{ARTIFACT_PREFIX}/{artifact_id}/chunks"


def all_devices(channel: DeviceChannel) -> str:
    """Subscription filter matching one channel of every device."""
    return f"{DEVICE_PREFIX}/+/{channel.value}"


def shared(filter_: str, group: str) -> str:
    """An MQTT 5 shared subscription of ``filter_`` for ``group`` (scale-out: several controllers)."""
    return f"$share/{group}/{filter_}"


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A parsed device topic."""

    device_id: str
    channel: DeviceChannel


_DEVICE_TOPIC_RE = re.compile(
    rf"^{re.escape(DEVICE_PREFIX)}/(?P<id>[^/]+)/(?P<channel>state|telemetry|events|cmd|results|chunks)$"
)


@lru_cache(maxsize=65_536)
def parse_device(topic: str) -> DeviceTopic | None:
    """Parse ``slmfleet/v1/dev/{id}/{channel}``; None for anything else (including bad ids).

    Cached (bounded): a fleet sends on the same few topics per device all day, and the two regular
    expressions cost more than the rest of routing a message. ``DeviceTopic`` is immutable."""
    m = _DEVICE_TOPIC_RE.match(topic)
    if m is None or not is_valid_id(m.group("id")):
        return None
    return DeviceTopic(m.group("id"), DeviceChannel(m.group("channel")))


def matches(filter_: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest), ignoring ``$share`` prefixes."""
    if filter_.startswith("$share/"):
        filter_ = filter_.split("/", 2)[2]
    if topic.startswith("$") and not filter_.startswith("$"):
        return False
    f_parts = filter_.split("/")
    t_parts = topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts):
            return False
        if part != "+" and part != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)

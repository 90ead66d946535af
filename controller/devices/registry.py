"""The controller's live view of devices: who is known, who is online, when each was last heard.

The database is the record; this in-memory view answers the hot-path
questions (is this device known? is this telemetry a replay?) without a query
per message, and finds devices whose silence outlasted their keepalive.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

ONLINE = "online"
OFFLINE = "offline"


@dataclass
class LiveDevice:
    status: str
    last_seen: float
    keepalive_s: float
    telemetry_interval_s: float
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=32))

    def silence_limit(self, factor: float) -> float:
        return factor * max(self.keepalive_s, self.telemetry_interval_s)


class DeviceRegistry:
    """Thread-safe; every method takes the current time explicitly where it matters."""

    def __init__(self, offline_after_factor: float = 3.0) -> None:
        self.offline_after_factor = offline_after_factor
        self._devices: dict[str, LiveDevice] = {}
        self._seen: dict[str, float] = {}  # heard since the last take_seen()
        self._lock = threading.Lock()

    def load(self, rows: Iterable[tuple[str, str, float, float, float]]) -> None:
        """Seed from the database: ``(id, status, last_seen, keepalive_s, telemetry_interval_s)``."""
        with self._lock:
            for device_id, status, last_seen, keepalive, interval in rows:
                self._devices[device_id] = LiveDevice(status, last_seen, keepalive, interval)

    def known(self, device_id: str) -> bool:
        return device_id in self._devices

    def status(self, device_id: str) -> str | None:
        live = self._devices.get(device_id)
        return live.status if live else None

    def online(self, device_id: str, now: float, keepalive_s: float, telemetry_interval_s: float) -> bool:
        """A birth message: returns True when the device is new."""
        with self._lock:
            live = self._devices.get(device_id)
            if live is None:
                self._devices[device_id] = LiveDevice(ONLINE, now, keepalive_s, telemetry_interval_s)
                return True
            live.status = ONLINE
            live.last_seen = now
            live.keepalive_s = keepalive_s
            live.telemetry_interval_s = telemetry_interval_s
            return False

    def offline(self, device_id: str) -> bool:
        """A will or goodbye: returns True when the status changed."""
        with self._lock:
            live = self._devices.get(device_id)
            if live is None or live.status == OFFLINE:
                return False
            live.status = OFFLINE
            return True

    def heard(self, device_id: str, now: float) -> None:
        live = self._devices.get(device_id)
        if live is not None:
            live.last_seen = now
            self._seen[device_id] = now

    def learned(self, device_id: str, last_seen: float) -> None:
        """Another controller replica heard the device at ``last_seen`` (the database says so): counts against its
        silence here too, without being written back."""
        live = self._devices.get(device_id)
        if live is not None and last_seen > live.last_seen:
            live.last_seen = last_seen

    def take_seen(self) -> dict[str, float]:
        """Last-heard times that changed since the previous call (for a periodic database update)."""
        with self._lock:
            seen, self._seen = self._seen, {}
        return seen

    def is_replay(self, device_id: str, ts: float, seq: int) -> bool:
        """True when this (ts, seq) telemetry was seen recently (a re-send after a reconnect)."""
        live = self._devices.get(device_id)
        if live is None:
            return False
        key = (ts, seq)
        with self._lock:
            if key in live.recent:
                return True
            live.recent.append(key)
        return False

    def lapsed(self, now: float, listening_since: float) -> list[str]:
        """Online devices silent beyond their limit; they are marked offline here.

        Silence is only counted from ``listening_since`` (when the controller's own
        connection came up), so a controller outage does not mark the fleet offline.
        """
        out = []
        with self._lock:
            for device_id, live in self._devices.items():
                if live.status != ONLINE:
                    continue
                since = max(live.last_seen, listening_since)
                if now - since > live.silence_limit(self.offline_after_factor):
                    live.status = OFFLINE
                    out.append(device_id)
        return out

    def forget(self, device_id: str) -> None:
        with self._lock:
            self._devices.pop(device_id, None)

    def counts(self) -> dict[str, int]:
        c = Counter(live.status for live in list(self._devices.values()))
        return {ONLINE: c.get(ONLINE, 0), OFFLINE: c.get(OFFLINE, 0)}

    def __len__(self) -> int:
        return len(self._devices)

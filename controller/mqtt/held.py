"""Telemetry and events of a device whose birth has not arrived yet, held a few seconds for it.

With NATS ingest a device's birth and its telemetry reach the controller on different subscriptions (the birth
on one every replica has, the telemetry in a queue group; and a second copy of the birth over MQTT). nats-py
runs each subscription's callback in a task of its own, with its own queue, so what the server sent in order
(birth, then telemetry) can be handled in the other order: the telemetry of a device just born would find it
unknown. The handler holds such messages here, decoded and checked, until the birth comes (then handles them in
the order they came) or ``hold_s`` passes (then they are dropped as ``unknown_device``, as before). Bounded in
messages per device, in devices and in bytes: a flood of strangers costs no more than that, and what does not
fit is dropped at once. Thread-safe (the handler runs on the MQTT loop; expiry may run elsewhere).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from wire.topics import DeviceChannel


@dataclass
class _Held:
    since: float
    messages: list[tuple[DeviceChannel, Any]] = field(default_factory=list)


class HeldTraffic:
    """Messages of unknown devices, per device in arrival order, until ``release`` or ``expire``."""

    def __init__(
        self, hold_s: float, *, per_device: int = 64, max_devices: int = 10_000, max_bytes: int = 32 * 1024 * 1024
    ) -> None:
        if hold_s <= 0:
            raise ValueError("hold_s must be > 0 (0 means: do not hold, so build no HeldTraffic)")
        self.hold_s = hold_s
        self.per_device = per_device
        self.max_devices = max_devices
        self.max_bytes = max_bytes
        self._devices: dict[str, _Held] = {}
        self._order: deque[tuple[float, str]] = deque()  # (since, device): oldest first
        self._bytes = 0
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(h.messages) for h in self._devices.values())

    def hold(self, device_id: str, channel: DeviceChannel, msg: Any, size: int, now: float) -> bool:
        """Keep ``msg`` (``size`` bytes on the wire) for ``device_id``; False when it does not fit (drop it)."""
        with self._lock:
            held = self._devices.get(device_id)
            if held is None:
                if len(self._devices) >= self.max_devices:
                    return False
                held = self._devices[device_id] = _Held(now)
                self._order.append((now, device_id))
            if len(held.messages) >= self.per_device or self._bytes + size > self.max_bytes:
                return False
            held.messages.append((channel, msg))
            self._bytes += size
            self._sizes[device_id] = self._sizes.get(device_id, 0) + size
            return True

    def release(self, device_id: str) -> list[tuple[DeviceChannel, Any]]:
        """The device was born: its held messages, oldest first (its entry in the expiry order goes stale)."""
        with self._lock:
            held = self._devices.pop(device_id, None)
            self._bytes -= self._sizes.pop(device_id, 0)
            return held.messages if held is not None else []

    def expire(self, now: float) -> list[tuple[str, list[tuple[DeviceChannel, Any]]]]:
        """The devices held ``hold_s`` or longer without a birth, each with its messages (now dropped)."""
        out = []
        with self._lock:
            order = self._order
            while order and now - order[0][0] >= self.hold_s:
                since, device_id = order.popleft()
                held = self._devices.get(device_id)
                if held is None or held.since != since:
                    continue  # released since (and maybe held again, with a later entry)
                del self._devices[device_id]
                self._bytes -= self._sizes.pop(device_id, 0)
                out.append((device_id, held.messages))
        return out

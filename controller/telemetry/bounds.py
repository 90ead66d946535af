"""What a device reports, held to what is physically possible for that device and to the controller's clock.

The wire schema refuses what no device can send at all (``wire.messages``: 1.7e308 % CPU, a
60 KB CPU model, a timestamp past the year 3000). Here, per device and at ingest:

* CPU above 100 % per core of the device (its birth says how many) and resident memory above its RAM are
  clamped to those limits, counted in ``slmfleet_values_clamped_total{field}``;
* a timestamp more than ``max_clock_skew_s`` ahead of the controller's clock, or older than the telemetry
  retention, is flagged (``slmfleet_clock_skew_total{channel}``, ``clock_skew_s`` in the stored row's data,
  a log line per device a minute) and the row is stored at the controller's receive time instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from prometheus_client import Counter

from controller.metrics import Metrics
from controller.telemetry import fast
from controller.telemetry.fast import FastTelemetry
from wire.messages import HardwareProfile, Telemetry

log = logging.getLogger(__name__)


class ValueBounds:
    def __init__(self, metrics: Metrics, max_future_s: float, max_past_s: float) -> None:
        self.max_future_s = max_future_s
        self.max_past_s = max_past_s
        self._limits: dict[str, tuple[float, int]] = {}  # device -> (cpu percent, ram bytes)
        self._lock = threading.Lock()
        self._logged: OrderedDict[str, float] = OrderedDict()  # device -> when it was last logged
        self.clamped = Counter(
            "slmfleet_values_clamped",
            "Reported values beyond what the device can do (CPU over its cores, RSS over its RAM), clamped",
            ["field"],
            registry=metrics.registry,
        )
        self.skewed = Counter(
            "slmfleet_clock_skew",
            "Messages whose device timestamp was too far from the controller's clock (stored at receive time)",
            ["channel"],
            registry=metrics.registry,
        )

    def _note(self, device_id: str, message: str, *args: object) -> None:
        """Log ``message`` for a device at most once a minute (bounded memory)."""
        now = time.monotonic()
        with self._lock:
            last = self._logged.get(device_id)
            if last is not None and now - last < 60.0:
                return
            self._logged[device_id] = now
            self._logged.move_to_end(device_id)
            while len(self._logged) > 10_000:
                self._logged.popitem(last=False)
        log.warning("device %s: " + message, device_id, *args)

    def learn(self, device_id: str, hardware: HardwareProfile) -> None:
        """A birth: what this device is (its limits)."""
        with self._lock:
            self._limits[device_id] = (100.0 * hardware.cpu_count, hardware.ram_bytes)

    def forget(self, device_id: str) -> None:
        with self._lock:
            self._limits.pop(device_id, None)

    def telemetry(self, device_id: str, msg: Telemetry | FastTelemetry) -> Telemetry | FastTelemetry:
        """``msg`` with CPU and RSS clamped to the device's limits (unchanged when it has none on record)."""
        limits = self._limits.get(device_id)
        if limits is None:
            return msg
        cpu_max, ram = limits
        update: dict[str, float | int] = {}
        if msg.cpu_percent > cpu_max:
            update["cpu_percent"] = cpu_max
        if ram > 0 and msg.rss_bytes > ram:
            update["rss_bytes"] = ram
        if not update:
            return msg
        for name in update:
            self.clamped.labels(name).inc()
        self._note(
            device_id, "%s beyond what it has (%.0f %% CPU, %d bytes RAM): clamped", ", ".join(update), cpu_max, ram
        )
        return fast.replace(msg, **update)

    def clock_skew(self, device_id: str, channel: str, ts: float, now: float) -> float | None:
        """How far ``ts`` is from ``now`` when that is too far (the message is then stored at ``now``), else None."""
        skew = ts - now
        if -self.max_past_s <= skew <= self.max_future_s:
            return None
        self.skewed.labels(channel).inc()
        self._note(device_id, "its clock is %+.0f s off the controller's: %s stored at receive time", skew, channel)
        return skew

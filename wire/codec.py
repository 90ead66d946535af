"""Encoding and validating payloads; bad payloads become counted data, not exceptions."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from wire.messages import (
    MAX_COMMAND_PAYLOAD,
    MAX_CONTROL_PAYLOAD,
    CommandMessage,
    EventMessage,
    StateMessage,
    Telemetry,
)
from wire.topics import DeviceChannel

_ADAPTERS: dict[DeviceChannel, TypeAdapter[Any]] = {
    DeviceChannel.STATE: TypeAdapter(StateMessage),
    DeviceChannel.TELEMETRY: TypeAdapter(Telemetry),
    DeviceChannel.EVENTS: TypeAdapter(EventMessage),
    DeviceChannel.CMD: TypeAdapter(CommandMessage),
}


class PayloadError(Exception):
    """A payload that cannot be accepted; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(message: BaseModel) -> bytes:
    """Serialize a message to its JSON wire form."""
    return message.model_dump_json(exclude_none=True).encode()


def decode(channel: DeviceChannel, payload: bytes, max_size: int | None = None) -> Any:
    """Validate ``payload`` as a message of ``channel``; raise PayloadError when it is not one."""
    if max_size is None:
        max_size = MAX_COMMAND_PAYLOAD if channel == DeviceChannel.CMD else MAX_CONTROL_PAYLOAD
    adapter = _ADAPTERS.get(channel)
    if adapter is None:
        raise PayloadError("channel", f"no messages are defined for channel {channel.value!r}")
    _check_size(payload, max_size)
    try:
        # the adapter's compiled validator itself: TypeAdapter.validate_json adds a Python call per message
        return adapter.validator.validate_json(payload)
    except ValidationError as exc:
        raise _schema_error(exc) from None


def parse_command(payload: bytes, max_size: int = MAX_COMMAND_PAYLOAD) -> tuple[dict[str, Any], Any]:
    """A command payload as the JSON object received (what its signature covers) and the validated command.

    Both come from one parse, so what is verified (``signing.open_command``) is exactly what is obeyed.
    """
    _check_size(payload, max_size)
    try:
        obj = json.loads(payload, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, NaN/Infinity
        raise PayloadError("not_json", str(exc)[:200]) from None
    if not isinstance(obj, dict):
        raise PayloadError("schema", f"payload: a command is a JSON object, not {type(obj).__name__}")
    try:
        return obj, _ADAPTERS[DeviceChannel.CMD].validate_python(obj)
    except ValidationError as exc:
        raise _schema_error(exc) from None


def _check_size(payload: bytes, max_size: int) -> None:
    if len(payload) > max_size:
        raise PayloadError("too_large", f"{len(payload)} bytes exceeds the {max_size} byte limit")
    if not payload:
        raise PayloadError("empty", "empty payload")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _schema_error(exc: ValidationError) -> PayloadError:
    errors = exc.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return PayloadError("not_json", str(errors[0]["msg"])[:200])
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    where = ".".join(str(p) for p in first["loc"]) or "payload"
    return PayloadError("schema", f"{where}: {first['msg']}"[:300])


class DropCounter:
    """Counts dropped payloads by (channel, reason) and logs each source at most once per interval.

    Thread-safe. The per-source memory is bounded so a flood of forged sources
    cannot grow it without limit.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = 10_000,
        on_drop: Callable[[str, str], None] | None = None,
    ) -> None:
        self._logger = logger
        self._interval = interval_s
        self._clock = clock
        self._max_sources = max_sources
        self._last_logged: OrderedDict[str, float] = OrderedDict()
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._on_drop = on_drop
        self.counts: Counter[tuple[str, str]] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def drop(self, source: str, channel: str, reason: str, detail: str) -> None:
        """Record one dropped payload from ``source`` (a device id or topic)."""
        now = self._clock()
        with self._lock:
            self.counts[(channel, reason)] += 1
            last = self._last_logged.get(source)
            should_log = last is None or now - last >= self._interval
            if should_log:
                suppressed = self._suppressed.pop(source, 0)
                self._last_logged[source] = now
                self._last_logged.move_to_end(source)
                while len(self._last_logged) > self._max_sources:
                    old, _ = self._last_logged.popitem(last=False)
                    self._suppressed.pop(old, None)
            elif len(self._suppressed) < self._max_sources or source in self._suppressed:
                self._suppressed[source] += 1
        if self._on_drop is not None:
            self._on_drop(channel, reason)
        if should_log:
            more = f" ({suppressed} more suppressed)" if suppressed else ""
            self._logger.warning("dropped %s payload from %s: %s: %s%s", channel, source, reason, detail, more)

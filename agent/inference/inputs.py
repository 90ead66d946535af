"""Stream inputs: JSON-lines files and stdin, and records carried by MQTT messages (sensor gateways).

Files and stdin are read by a thread each and submitted with back-pressure (a file is never half
served because the queue was momentarily full). MQTT payloads arrive on the event loop; they are
turned into records here and submitted without waiting (a full queue drops them, counted).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Literal

from agent.inference.engine import InferenceEngine
from agent.inference.session import InputError

log = logging.getLogger(__name__)

#: ``on_done(source, records, bad_lines)`` when a finite input ends.
InputDone = Callable[[str, int, int], None]


def read_json_lines(stream: IO[str], sink: Callable[[Any], bool], on_error: Callable[[], None]) -> int:
    """Feed each JSON line of ``stream`` to ``sink``; returns the number of lines read."""
    n = 0
    for line in stream:
        line = line.strip()
        if not line:
            continue
        n += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            on_error()
            continue
        sink(record)
    return n


def source_name(path: str) -> str:
    return "stdin" if path == "-" else f"file:{path}"


class JsonLinesInput:
    """Reads one JSON-lines file (or ``-``: stdin) in a thread and submits its records."""

    def __init__(self, path: str, engine: InferenceEngine, on_done: InputDone | None = None) -> None:
        self.path = path
        self.source = source_name(path)
        self.engine = engine
        self.on_done = on_done
        self.records = 0
        self.bad_lines = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"input {self.source}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _submit(self, record: Any) -> bool:
        # Block while the queue is full, but give up when the agent stops.
        while not self._stopping.is_set():
            if self.engine.submit(record, self.source, block=True, timeout=0.5):
                return True
        return False

    def _error(self) -> None:
        self.bad_lines += 1
        self.engine.counters.record_error()

    def _run(self) -> None:
        try:
            if self.path == "-":
                lines = read_json_lines(sys.stdin, self._submit, self._error)
            else:
                with open(self.path, encoding="utf-8") as f:
                    lines = read_json_lines(f, self._submit, self._error)
            self.records = lines - self.bad_lines
            log.info("input %s ended: %d records, %d lines not JSON", self.source, self.records, self.bad_lines)
        except OSError as exc:
            log.error("cannot read input %s: %s", self.source, exc)
        except Exception:
            log.exception("input %s failed", self.source)
        if self.on_done is not None:
            self.on_done(self.source, self.records, self.bad_lines)


@dataclass(frozen=True)
class PayloadFormat:
    """Where the record is in an MQTT payload.

    ``format``: "json" (the payload is JSON) or "text" (the UTF-8 payload is the text itself).
    ``path``: dotted path to the input inside a JSON payload ("" for the whole payload); a numeric
    segment indexes a list, e.g. ``data.readings`` or ``batch.0``.
    ``key``: when set, the extracted value becomes ``{key: value}`` (e.g. ``values`` for an anomaly
    window, ``text`` for text); otherwise it must be a JSON object (the record itself).
    ``id_path``: optional dotted path to an id echoed with the result.
    """

    format: Literal["json", "text"] = "json"
    path: str = ""
    key: str | None = None
    id_path: str = ""

    def record(self, payload: bytes) -> Any:
        """The record in ``payload``; InputError says what is wrong with it."""
        if self.format == "text":
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError("the payload is not UTF-8 text") from None
            return {self.key or "text": text}
        try:
            document = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"the payload is not JSON: {exc}") from None
        value = dig(document, self.path)
        if self.key is not None:
            record: Any = {self.key: value}
        elif isinstance(value, dict):
            record = value
        else:
            where = f"at {self.path!r}" if self.path else "as the payload"
            raise InputError(f"expected a JSON object {where}, got {type(value).__name__}; set mqtt_input_key")
        if self.id_path:
            try:
                ident = dig(document, self.id_path)
            except InputError:
                ident = None
            if isinstance(ident, str | int) and not isinstance(ident, bool):
                record = {**record, "id": ident}
        return record


def dig(document: Any, path: str) -> Any:
    """The value at dotted ``path`` in ``document`` ("" is the document itself)."""
    value = document
    if not path:
        return value
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise InputError(f"the payload has nothing at {path!r} (stopped at {part!r})")
    return value

"""A real HTTP receiver for webhook tests: a server on a free loopback port that records every request
and answers as scripted (status codes, delays), in a thread of its own."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from controller.broker.embedded import free_port


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """``script`` is consumed one answer per request (then ``default``); an answer is a status code or
    ``(status, delay_s)``."""

    port: int = field(default_factory=free_port)
    script: list[int | tuple[int, float]] = field(default_factory=list)
    default: int | tuple[int, float] = 200
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the standard library's name
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with owner._lock:
                    answer = owner.script.pop(0) if owner.script else owner.default
                status, delay = (answer, 0.0) if isinstance(answer, int) else answer
                headers = {k.lower(): v for k, v in self.headers.items()}
                owner._record(Received(self.path, headers, body, time.time(), status))
                if delay:
                    owner._release.wait(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain")
                    reply = b"ok" if status < 300 else f"receiver says {status}".encode()
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except OSError:
                    pass  # the sender gave up waiting (a timeout): nobody reads the answer

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"receiver-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _record(self, r: Received) -> None:
        with self._lock:
            self.received.append(r)

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def requests(self, event_type: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if event_type is None or r.headers.get("x-slmfleet-event") == event_type]

    def __iter__(self) -> Iterator[Received]:
        return iter(self.requests())

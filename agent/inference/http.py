"""The local HTTP endpoint for applications on the device: loopback only, standard library only.

* ``POST /v1/infer`` with one JSON record -> ``{"result": {...}, "model": {...}, "latency_ms": ...}``;
  with a JSON list of records -> ``{"results": [...], "model": ..., "latency_ms": ...}`` (queued as one
  unit, so they can share a micro-batch; a bad record gets ``{"error"}`` in its place).
* ``POST /v1/infer`` with ``{"prompt": ..., "stream": true}`` (generation): server-sent events as the
  tokens come, ``data: {"text": piece}`` each, then ``event: done`` with the whole text and the token
  count (``event: error`` if it fails midway). HTTP/1.1 responses are chunked.
* ``GET /v1/health`` -> the agent's state (model, queue, counters).

Status codes: 400 for a record the model cannot take, 413 for a body over the limit, 503 when no model
is loaded or the queue is full (a counted drop; ``Retry-After`` says when to try again), 500 when the
model fails. Keep-alive is supported; request bodies need a ``Content-Length``.

asyncio streams on the agent's own event loop: no web framework on the device, and no thread per
connection. Results of HTTP requests go back to the caller only, not to the results sinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from agent.inference.engine import NO_MODEL, InferenceEngine
from wire.messages import ModelRef

log = logging.getLogger(__name__)

_MAX_HEADER_LINE = 8192
_MAX_HEADERS = 100
_SOURCE = "http"


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_status(message: str) -> int:
    """The HTTP status for a result's error message from the engine."""
    if message.startswith(NO_MODEL):
        return HTTPStatus.SERVICE_UNAVAILABLE
    if message.startswith("inference failed"):
        return HTTPStatus.INTERNAL_SERVER_ERROR
    return HTTPStatus.BAD_REQUEST


def _ref(ref: ModelRef | None) -> dict[str, Any] | None:
    return ref.model_dump() if ref is not None else None


class _Request:
    __slots__ = ("method", "path", "version", "headers", "body")

    def __init__(self, method: str, path: str, version: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.version = version
        self.headers = headers
        self.body = body

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"


class HttpFrontend:
    """Serves the engine on ``host:port`` (loopback only). ``await start()``, ``await close()``."""

    def __init__(
        self,
        engine: InferenceEngine,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = 1024 * 1024,
        max_records: int = 1024,
        max_connections: int = 64,
        idle_timeout_s: float = 30.0,
        request_timeout_s: float = 300.0,
        health: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        if not is_loopback(host):
            raise ValueError(f"the inference endpoint binds to loopback only, not {host!r}")
        self.engine = engine
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.max_records = max_records
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.health = health or (lambda: {"status": "ok"})
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.requests = 0

    async def start(self) -> int:
        """Listen; returns the port (the one chosen when ``port`` was 0)."""
        self._server = await asyncio.start_server(self._client, self.host, self.port, limit=_MAX_HEADER_LINE * 2)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("inference endpoint on http://%s:%d/v1/infer", self.host, self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    # ------------------------------------------------------------ protocol --

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            if len(self._connections) > self.max_connections:
                await self._send_json(writer, HTTPStatus.SERVICE_UNAVAILABLE, {"error": "too many connections"}, False)
                return
            while True:
                try:
                    request = await self._read_request(reader)
                except HttpError as exc:
                    await self._send_json(writer, exc.status, {"error": str(exc)}, False)
                    return
                if request is None:
                    return
                self.requests += 1
                keep_alive = await self._route(request, writer)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            if task is not None:
                self._connections.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> _Request | None:
        try:
            line = await asyncio.wait_for(reader.readline(), self.idle_timeout_s)
        except (ValueError, asyncio.LimitOverrunError):
            raise HttpError(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long") from None
        if not line:
            return None
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        while True:
            try:
                raw = await asyncio.wait_for(reader.readline(), self.idle_timeout_s)
            except (ValueError, asyncio.LimitOverrunError):
                raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header line too long") from None
            if not raw:
                return None
            if raw in (b"\r\n", b"\n"):
                break
            if len(headers) >= _MAX_HEADERS:
                raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep:
                raise HttpError(HTTPStatus.BAD_REQUEST, "malformed header")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "identity").lower() != "identity":
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not supported: send Content-Length")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if length < 0:
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        if length > self.max_body_bytes:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes exceeds {self.max_body_bytes}"
            )
        body = await asyncio.wait_for(reader.readexactly(length), self.idle_timeout_s) if length else b""
        path = target.split("?", 1)[0]
        return _Request(method.upper(), path, version, headers, body)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        keep_alive: bool,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        reason = HTTPStatus(status).phrase
        head = [
            f"HTTP/1.1 {status} {reason}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Connection: keep-alive" if keep_alive else "Connection: close",
            "Cache-Control: no-store",
        ]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _send_json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        obj: Any,
        keep_alive: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        await self._send(writer, status, json.dumps(obj).encode(), keep_alive, extra=extra)

    # --------------------------------------------------------------- routes --

    async def _route(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        keep = request.keep_alive
        if request.path == "/v1/health":
            if request.method != "GET":
                await self._send_json(
                    writer, HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use GET"}, keep, {"Allow": "GET"}
                )
                return keep
            await self._send_json(writer, HTTPStatus.OK, self.health(), keep)
            return keep
        if request.path == "/v1/infer":
            if request.method != "POST":
                await self._send_json(
                    writer, HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST"}, keep, {"Allow": "POST"}
                )
                return keep
            return await self._infer(request, writer)
        await self._send_json(writer, HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {request.path}"}, keep)
        return keep

    async def _infer(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        keep = request.keep_alive
        try:
            doc = json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            await self._send_json(writer, HTTPStatus.BAD_REQUEST, {"error": f"the body is not JSON: {exc}"}, keep)
            return keep
        if isinstance(doc, dict) and doc.get("stream") is True:
            record = {k: v for k, v in doc.items() if k != "stream"}
            return await self._stream(record, request, writer)
        if isinstance(doc, dict):
            return await self._single(doc, keep, writer)
        if isinstance(doc, list) and doc:
            if len(doc) > self.max_records:
                await self._send_json(
                    writer,
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    {"error": f"{len(doc)} records in one request; the limit is {self.max_records}"},
                    keep,
                )
                return keep
            return await self._many(doc, keep, writer)
        await self._send_json(
            writer, HTTPStatus.BAD_REQUEST, {"error": "send one JSON object (a record) or a list of records"}, keep
        )
        return keep

    def _replier(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> Any:
        def reply(result: dict[str, Any], ref: ModelRef | None) -> None:
            def settle() -> None:
                if not future.done():
                    future.set_result((result, ref))

            loop.call_soon_threadsafe(settle)

        return reply

    async def _busy(self, writer: asyncio.StreamWriter, keep: bool) -> bool:
        await self._send_json(
            writer,
            HTTPStatus.SERVICE_UNAVAILABLE,
            {"error": "the inference queue is full; try again shortly"},
            keep,
            {"Retry-After": "1"},
        )
        return keep

    async def _single(self, record: dict[str, Any], keep: bool, writer: asyncio.StreamWriter) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        started = time.perf_counter()
        if not self.engine.submit(record, _SOURCE, reply=self._replier(loop, future), to_sinks=False):
            return await self._busy(writer, keep)
        try:
            result, ref = await asyncio.wait_for(future, self.request_timeout_s)
        except TimeoutError:
            await self._send_json(writer, HTTPStatus.GATEWAY_TIMEOUT, {"error": "inference timed out"}, False)
            return False
        latency = round((time.perf_counter() - started) * 1000.0, 3)
        if "error" in result:
            await self._send_json(writer, error_status(result["error"]), {**result, "model": _ref(ref)}, keep)
            return keep
        await self._send_json(
            writer, HTTPStatus.OK, {"result": result, "model": _ref(ref), "latency_ms": latency}, keep
        )
        return keep

    async def _many(self, records: list[Any], keep: bool, writer: asyncio.StreamWriter) -> bool:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in records]
        started = time.perf_counter()
        if not self.engine.submit_many(records, _SOURCE, [self._replier(loop, f) for f in futures]):
            return await self._busy(writer, keep)
        try:
            done = await asyncio.wait_for(asyncio.gather(*futures), self.request_timeout_s)
        except TimeoutError:
            await self._send_json(writer, HTTPStatus.GATEWAY_TIMEOUT, {"error": "inference timed out"}, False)
            return False
        latency = round((time.perf_counter() - started) * 1000.0, 3)
        results = [result for result, _ in done]
        ref = next((r for _, r in done if r is not None), None)
        if all("error" in r and r["error"].startswith(NO_MODEL) for r in results):
            await self._send_json(writer, HTTPStatus.SERVICE_UNAVAILABLE, {"error": NO_MODEL}, keep)
            return keep
        await self._send_json(
            writer, HTTPStatus.OK, {"results": results, "model": _ref(ref), "latency_ms": latency}, keep
        )
        return keep

    async def _stream(self, record: dict[str, Any], request: _Request, writer: asyncio.StreamWriter) -> bool:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

        def on_event(kind: str, data: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, data))

        keep = request.keep_alive
        pending = self.engine.submit_stream(record, _SOURCE, on_event)
        if pending is None:
            return await self._busy(writer, keep)
        try:
            kind, data = await asyncio.wait_for(events.get(), self.request_timeout_s)
        except TimeoutError:
            pending.cancelled.set()
            await self._send_json(writer, HTTPStatus.GATEWAY_TIMEOUT, {"error": "inference timed out"}, False)
            return False
        if kind == "error":
            await self._send_json(writer, error_status(data["error"]), data, keep)
            return keep
        chunked = request.version != "HTTP/1.0"
        keep = keep and chunked
        head = [
            "HTTP/1.1 200 OK",
            "Content-Type: text/event-stream; charset=utf-8",
            "Cache-Control: no-store",
            "X-Accel-Buffering: no",
            "Transfer-Encoding: chunked" if chunked else "",
            "Connection: keep-alive" if keep else "Connection: close",
        ]
        writer.write(("\r\n".join(h for h in head if h) + "\r\n\r\n").encode("latin-1"))
        try:
            while True:
                if kind == "piece":
                    frame = f"data: {json.dumps(data)}\n\n"
                else:
                    frame = f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                payload = frame.encode()
                if chunked:
                    payload = f"{len(payload):x}\r\n".encode() + payload + b"\r\n"
                writer.write(payload)
                await writer.drain()
                if kind != "piece":
                    break
                kind, data = await asyncio.wait_for(events.get(), self.request_timeout_s)
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pending.cancelled.set()
            return False
        except asyncio.CancelledError:
            pending.cancelled.set()
            raise
        return keep

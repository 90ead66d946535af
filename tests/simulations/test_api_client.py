"""The simulator's REST client survives a server closing a kept-alive connection as a request arrives."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from simulations.errors import SimulationError
from simulations.infra import Api


class ClosingServer:
    """Answers the first request of each connection (keeping it alive) and closes the connection, unanswered,
    when a second request arrives on it: what a server whose keep-alive timer fired does to a late client."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_request(conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            (int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"),
            0,
        )
        while len(rest) < length:
            rest += conn.recv(65536)
        return True

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            if not self._read_request(conn):
                return
            body = b'{"ok": true}'
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            self._read_request(conn)  # the second request: closed without an answer

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def server() -> Iterator[ClosingServer]:
    s = ClosingServer()
    yield s
    s.close()


def test_a_read_is_asked_again_on_a_new_connection(server: ClosingServer) -> None:
    api = Api(f"http://127.0.0.1:{server.port}", "t")
    assert api.get("/a") == {"ok": True}
    assert api.get("/b") == {"ok": True}  # the reused connection was closed under it: asked again
    assert server.connections == 2


def test_a_write_is_not_repeated_behind_the_callers_back(server: ClosingServer) -> None:
    api = Api(f"http://127.0.0.1:{server.port}", "t")
    assert api.get("/a") == {"ok": True}
    with pytest.raises(SimulationError, match="POST .*/b"):
        api.post("/b", json={})
    assert server.connections == 1

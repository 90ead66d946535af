"""Fixtures of the security tests: a controller served over real HTTP on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from sqlmodel import Session

from controller.app import create_app
from controller.auth.tokens import Role, create_token
from controller.broker.embedded import EmbeddedBroker
from controller.cli.up import KEEP_ALIVE_S
from controller.runtime import ControllerRuntime
from tests.conftest import controller_settings
from tests.helpers import wait_until


@dataclass
class LiveServer:
    """A controller app served by uvicorn in a thread of this process."""

    runtime: ControllerRuntime
    url: str
    admin_token: str
    server: uvicorn.Server
    thread: threading.Thread

    def token(self, role: Role, name: str = "t") -> str:
        with Session(self.runtime.engine) as session:
            secret, _ = create_token(session, name, role)
        return secret

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "the API server did not stop"


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start controllers on free ports of 127.0.0.1 (optionally on a broker); all stopped at the end."""
    started: list[LiveServer] = []

    def start(broker: EmbeddedBroker | None = None, **overrides: object) -> LiveServer:
        settings = controller_settings(tmp_path / f"ctl-{len(started)}", broker, **overrides)
        runtime = ControllerRuntime(settings)
        app = create_app(settings, runtime)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", timeout_keep_alive=KEEP_ALIVE_S
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
        thread.start()
        wait_until(lambda: server.started or not thread.is_alive(), 30, what="uvicorn started")
        assert server.started, "the API server failed to start"
        port = server.servers[0].sockets[0].getsockname()[1]
        with Session(runtime.engine) as session:
            admin, _ = create_token(session, "fuzz-admin", Role.ADMIN)
        live = LiveServer(runtime, f"http://127.0.0.1:{port}", admin, server, thread)
        started.append(live)
        if broker is not None:
            assert runtime.bridge is not None
            bridge = runtime.bridge
            wait_until(lambda: bridge.connected, 15, what="controller connected to the broker")
        return live

    yield start
    for live in reversed(started):
        live.stop()

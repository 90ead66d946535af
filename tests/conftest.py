"""Fixtures: private brokers on free ports, in-process controllers, temporary data."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from controller.app import create_app
from controller.auth.tokens import Role, create_token
from controller.broker.embedded import EmbeddedBroker, mosquitto_binary
from controller.runtime import ControllerRuntime
from controller.settings import ControllerSettings, load_settings
from tests.helpers import wait_until

#: auto (mosquitto when installed, else amqtt), mosquitto or amqtt
BROKER_ENGINE = os.environ.get("SLMFLEET_TEST_BROKER", "auto")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with slow-marked tests first (stable otherwise): with ``make test``'s two workers taking whole files in
    this order, the long files start early instead of ending the run on one worker while the other idles."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)


def pytest_report_header(config: pytest.Config) -> str:
    found = mosquitto_binary()
    engine = BROKER_ENGINE if BROKER_ENGINE != "auto" else ("mosquitto" if found else "amqtt")
    return f"slmfleet test broker: {engine} (SLMFLEET_TEST_BROKER={BROKER_ENGINE}; mosquitto binary: {found})"


def _broker(path: Path) -> EmbeddedBroker:
    broker = EmbeddedBroker(path, engine=BROKER_ENGINE)  # type: ignore[arg-type]
    broker.start()
    return broker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One private broker for the session (never the machine's port 1883)."""
    b = _broker(tmp_path_factory.mktemp("broker"))
    yield b
    b.stop()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of this test's own: retained state from other tests cannot leak in, and it may be restarted."""
    b = _broker(tmp_path / "broker")
    yield b
    b.stop()


@pytest.fixture
def requires_mosquitto() -> None:
    if mosquitto_binary() is None or BROKER_ENGINE == "amqtt":
        pytest.skip("needs mosquitto (a process that can be restarted); running against amqtt")


@dataclass
class LiveController:
    runtime: ControllerRuntime
    client: TestClient
    token: str
    broker: EmbeddedBroker

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def token_for(self, role: Role, name: str = "t") -> str:
        with Session(self.runtime.engine) as session:
            token, _ = create_token(session, name, role)
        return token

    def flush(self) -> None:
        assert self.runtime.writer.flush(10)


def controller_settings(data_dir: Path, broker: EmbeddedBroker | None, **overrides: object) -> ControllerSettings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "broker_url": broker.url if broker else None,
        "mqtt_client_id": f"ctl-{uuid.uuid4().hex[:8]}",
        "mqtt_protocol": "3.1.1" if broker is not None and broker.engine == "amqtt" else "auto",
        "ingest_flush_interval_s": 0.02,
        "sweep_interval_s": 0.2,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def make_controller(tmp_path: Path) -> Iterator[object]:
    """Build in-process controllers (REST through TestClient, MQTT to a real broker)."""
    clients: list[TestClient] = []

    def make(broker: EmbeddedBroker | None, **overrides: object) -> LiveController:
        data_dir = overrides.pop("data_dir", tmp_path / f"ctl-{len(clients)}")
        settings = controller_settings(data_dir, broker, **overrides)  # type: ignore[arg-type]
        runtime = ControllerRuntime(settings)
        client = TestClient(create_app(settings, runtime))
        client.__enter__()
        clients.append(client)
        with Session(runtime.engine) as session:
            token, _ = create_token(session, "test-admin", Role.ADMIN)
        if broker is not None:
            assert runtime.bridge is not None
            wait_until(lambda: runtime.bridge.connected, 15, what="controller connected to the broker")
        return LiveController(runtime, client, token, broker)  # type: ignore[arg-type]

    yield make
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture
def controller(private_broker: EmbeddedBroker, make_controller) -> LiveController:  # type: ignore[no-untyped-def]
    """An in-process controller on a private broker."""
    return make_controller(private_broker)  # type: ignore[no-any-return]

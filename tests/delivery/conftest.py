"""Protocol peers (devices speaking the wire protocol on the test's broker) for the delivery suites; each module
defines ``ctl``, the controller they talk to."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.delivery.peer import PeerDevice
from tests.helpers import wait_until


@pytest.fixture
def peers(ctl: Any) -> Iterator[Callable[..., PeerDevice]]:
    """``peers(device_id, **kw)`` connects a peer device and waits until the controller knows it."""
    made: list[PeerDevice] = []
    key = ctl.client.get("/api/v1/signing-key").json()["public_key_pem"]

    def make(device_id: str, **kw: Any) -> PeerDevice:
        peer = PeerDevice(ctl.broker.port, device_id, key, **kw)
        made.append(peer)
        wait_until(lambda: ctl.client.get(f"/api/v1/devices/{device_id}").status_code == 200, 10)
        return peer

    yield make
    for p in made:
        p.close()

"""A 3-node NATS cluster (MQTT + JetStream) of the test's own, on free ports in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.nats_cluster import NatsCluster, nats_binary


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    if nats_binary() is None:
        pytest.skip("nats-server not found on PATH (Debian: apt-get install nats-server)")
    cluster = NatsCluster(tmp_path / "nats")
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()

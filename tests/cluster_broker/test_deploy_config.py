"""The NATS configuration deploy/nats ships is one nats-server accepts, and says what the tests rely on."""

from __future__ import annotations

import os
import subprocess

import pytest

from benchmarks.nats_cluster import nats_binary
from tests.helpers import REPO

CONF = REPO / "deploy" / "nats" / "nats.conf"


def test_the_shipped_node_configuration_is_valid_and_replicates_mqtt_state_on_three_nodes() -> None:
    binary = nats_binary()
    if binary is None:
        pytest.skip("nats-server not found on PATH (Debian: apt-get install nats-server)")
    env = {**os.environ, "SLMFLEET_NATS_NAME": "nats-1"}
    result = subprocess.run([binary, "-c", str(CONF), "-t"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr
    text = CONF.read_text()
    for line in ("stream_replicas: 3", "jetstream {", "mqtt {", "server_name: $SLMFLEET_NATS_NAME"):
        assert line in text

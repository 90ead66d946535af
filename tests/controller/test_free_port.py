"""Ports handed to brokers and servers the product and the tests start: free, and out of the way of outgoing
connections (the kernel gives those ports of its ephemeral range)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from controller.broker.embedded import free_port

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


@pytest.mark.skipif(not RANGE_FILE.is_file(), reason="no ephemeral port range to stay out of on this system")
def test_ports_are_free_below_the_ephemeral_range_and_not_repeated() -> None:
    low = int(RANGE_FILE.read_text().split()[0])
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    assert all(1024 < p < low for p in ports)
    for port in ports[:3]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free indeed

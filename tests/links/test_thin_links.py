"""Thin and lossy links (issue 19): real agent processes in network namespaces behind emulated links, the
controller (``slmfleet up`` with its embedded mosquitto) in a hub namespace. The topology, the shaping and the
measurement are ``benchmarks/links.py`` (``python -m benchmarks links`` reports the same figures)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benchmarks.links import LinksUnavailable, Setup, measure

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
        reason="needs root and iproute2 (network namespaces, tc)",
    ),
]


def test_slow_lossy_links_do_not_hold_the_fleet_back_and_everyone_ends_on_the_model(tmp_path: Path) -> None:
    """4 devices on fast links, 2 on 1 Mbit/s with 5% loss, 1 cut off for the whole broadcast. A 4 MiB model
    in 4 KiB chunks: 1025 chunks, four times the broadcast's window of 256, so pacing to the slow links would
    hold the fast devices until the slow ones were three quarters done."""
    setup = Setup(fast=4, slow=2, offline=1, size_bytes=4 * 2**20, chunk_size=4096, rate_kbit=1000, loss_pct=5.0)
    try:
        r = measure(tmp_path, setup)
    except LinksUnavailable as exc:
        pytest.skip(str(exc))
    base, mixed, offline = r["baseline"], r["mixed"], r["offline"]
    summary = f"figures: {r}"
    assert r["conditions"]["chunks"] > 1000, summary

    # every device ends on the new model, verified (the agents report it active only after its self-test)
    assert base["fast"]["finished"] == 4 and mixed["fast"]["finished"] == 4, summary
    assert mixed["slow"]["finished"] == 2 and offline["finished"] == 1, summary
    assert set(r["active_versions"].values()) == {r["versions"][1]}, summary

    # the slow links do not hold the fast devices back: they are done before the slow ones are half done,
    # and within a generous bound of the baseline without slow devices (it includes the few seconds the
    # broadcast waits before it stops waiting for a slow device)
    assert all(share < 0.5 for share in mixed["slow_share_held_when_fast_done"].values()), summary
    assert mixed["fast"]["downloaded_s"]["max"] < mixed["slow"]["downloaded_s"]["min"] / 2, summary
    assert mixed["fast"]["downloaded_s"]["max"] <= 3 * base["fast"]["downloaded_s"]["max"] + 10, summary

    # bytes: the controller publishes one copy for the whole fleet and repairs at most a copy per slow device;
    # each link carries about one copy (frame, MQTT and TCP/IP overhead, retransmissions on the lossy links)
    assert mixed["controller_copies"]["broadcast"] <= 1.05, summary
    assert mixed["controller_copies"]["repair"] <= setup.slow * 1.0, summary
    assert all(copies <= 1.5 for copies in mixed["link_copies"].values()), summary
    assert sum(mixed["hub_side_drops"].values()) > 0, summary  # the loss was real

    # the device that was away gets the model over its link once it is back, about one copy of it
    assert offline["link_copies"]["away-0"] <= 1.5, summary
    assert sum(offline["controller_copies"].values()) <= 1.1, summary

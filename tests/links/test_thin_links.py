"""Thin and lossy links (issue 19): real agent processes in network namespaces behind emulated links, the
controller (``slmfleet up`` with its embedded mosquitto) in a hub namespace. The topology, the shaping and the
measurement are ``benchmarks/links.py`` (``python -m benchmarks links`` reports the same figures)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benchmarks.links import LinksUnavailable, Setup, measure
from controller.delivery.transfer import TransferSettings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
        reason="needs root and iproute2 (network namespaces, tc)",
    ),
]

#: how much slower than the baseline (the fast devices alone, in the same run) they may be with the slow links
#: present (plus the laggard wait): a loaded machine's speed changes between phases; paced to the slow links
#: they were 5.8-6.5 times slower
FAST_VS_BASELINE = 3.0


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

    # The slow links do not hold the fast devices back. Both bounds hold on a loaded machine: the first compares
    # with the baseline measured in this run, the second follows from the broadcast's window, not from time.
    # - The fast devices take about as long as without slow devices: at most FAST_VS_BASELINE times the
    #   baseline (the load may change between the phases), plus the once-per-broadcast wait before a slow
    #   device stops being waited for (laggard_after_s). Paced to the slow links they take the slow links'
    #   time to three quarters of the artifact: 5.8-6.5 times the baseline, measured with the laggard rule off.
    # - A broadcast paced to a device never runs more than a window ahead of it, so the fast devices could not
    #   have every chunk before the slow ones held all but the last window (0.75 of 1025 chunks; 0.76-0.78 measured
    #   with the laggard rule off). With the rule they hold what their link carried meanwhile (0.22-0.33).
    settings = TransferSettings()
    fast_s, base_s = mixed["fast"]["downloaded_s"]["max"], base["fast"]["downloaded_s"]["max"]
    assert fast_s <= FAST_VS_BASELINE * base_s + settings.laggard_after_s, summary
    paced_floor = r["conditions"]["chunks"] - settings.window
    assert all(held < paced_floor for held in mixed["slow_chunks_held_when_fast_done"].values()), summary

    # bytes: the controller publishes one copy for the whole fleet and repairs what a slow device lacks; each
    # link carries about one copy (frame, MQTT and TCP/IP overhead, retransmissions on the lossy links).
    # Repairs: 0 when the slow devices follow the broadcast from its start; when they join it late (their
    # Deploy crossed the slow link) they lack nearly everything, and repair frames the broker drops from a slow
    # client's full queue are sent again: 1.46 copies per slow device in one clean-clone run, while each slow
    # link still carried 1.12. The bound is two copies per slow device, and the links' bound below.
    assert mixed["controller_copies"]["broadcast"] <= 1.05, summary
    assert mixed["controller_copies"]["repair"] <= setup.slow * 2.0, summary
    assert all(copies <= 1.5 for copies in mixed["link_copies"].values()), summary
    assert sum(mixed["hub_side_drops"].values()) > 0, summary  # the loss was real

    # the device that was away gets the model over its link once it is back, about one copy of it
    assert offline["link_copies"]["away-0"] <= 1.5, summary
    assert sum(offline["controller_copies"].values()) <= 1.1, summary

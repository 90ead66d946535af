"""How the broadcast paces itself: never more than a window ahead of the devices it waits for, and not waiting
for a device on a slow link while the others have everything sent so far (it reads its broker queue and
repairs). The same over real emulated links: tests/links/test_thin_links.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from controller.delivery.transfer import Broadcast, TransferSettings

SETTINGS = TransferSettings(window=100, laggard_after_s=5.0, stall_s=5.0)


def broadcast(sent: int) -> Broadcast:
    source: Any = SimpleNamespace(artifact_id="ab" * 32)
    b = Broadcast(source, lambda topic, frame, acked: True, SETTINGS, lambda n: None)
    b.next_index = sent
    return b


def report(b: Broadcast, device_id: str, contiguous: int, now: float, downloading: bool = True) -> None:
    b.progress(device_id, contiguous, contiguous, downloading)
    b.participants[device_id].last_progress_at = now


def test_a_slow_device_holds_the_broadcast_only_until_it_is_a_laggard() -> None:
    b = broadcast(sent=100)
    t = b.created_at
    report(b, "fast", 100, t)  # has every chunk sent: waits
    report(b, "slow", 10, t)
    assert b.position(t) == 10  # held: no more than a window ahead of the slow device
    for step in range(1, 5):  # the slow device keeps progressing, slowly, the fast one keeps waiting
        b.next_index = 10 + step + 100
        report(b, "slow", 10 + step, t + step)
        report(b, "fast", b.next_index, t + step)
        assert b.position(t + step) == 10 + step
    assert not b.participants["slow"].laggard
    report(b, "slow", 15, t + 5)
    assert b.position(t + 5) == 114  # five seconds behind while another waited: paced by the fast one alone
    assert b.participants["slow"].laggard and b.laggards == 1
    report(b, "fast", 400, t + 6, downloading=False)  # the fast one is done: only the laggard downloads, nothing holds
    assert b.position(t + 6) == b.next_index


def test_devices_reading_at_the_same_pace_are_never_laggards() -> None:
    """The slowest of equals stays within half a window of the head (or nobody waits): it paces as before."""
    b = broadcast(sent=100)
    t = b.created_at
    for step in range(30):
        b.next_index = step * 10 + 100  # the head a window ahead of the slowest: nobody has everything sent
        report(b, "a", step * 10 + 60, t + step)
        report(b, "b", step * 10 + 55, t + step)
        assert b.position(t + step) == step * 10 + 55
    assert not any(p.laggard for p in b.participants.values())


def test_a_device_behind_while_nobody_waits_is_not_a_laggard() -> None:
    b = broadcast(sent=100)
    t = b.created_at
    for step in range(10):
        report(b, "x", 20 + step, t + step)
        report(b, "y", 30 + step, t + step)
        assert b.position(t + step) == 20 + step
    assert b.laggards == 0

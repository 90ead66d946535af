"""The broadcast with devices that hold part of an artifact already (``controller/delivery/transfer.py``): it
starts at the first chunk the slowest device lacks, and a sparse device (it asks for its few missing chunks
alone) does not hold it back or keep it going."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from controller.delivery.transfer import Broadcast, TransferSettings


class Source:
    """The part of ``ChunkSource`` a broadcast uses: ``n`` frames of a fake artifact."""

    shared = False
    artifact_id = "ab" * 32

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def frame(self, index: int) -> bytes:
        return index.to_bytes(4, "big")


def run_broadcast(n: int, reports: list[tuple[str, int, bool]], timeout: float = 5.0) -> list[int]:
    """Broadcast an ``n``-chunk artifact to devices that reported ``(device, contiguous, sparse)``; the indices
    published (acknowledged at once), once the broadcast ends or the deadline passes."""
    sent: list[int] = []

    async def main() -> None:
        def publish(topic: str, frame: bytes, acked: Callable[[], None]) -> bool:
            sent.append(int.from_bytes(frame, "big"))
            asyncio.get_running_loop().call_soon(acked)
            return True

        settings = TransferSettings(window=8, max_inflight=4, start_grace_s=0.0)
        broadcast = Broadcast(Source(n), publish, settings, lambda size: None)  # type: ignore[arg-type]
        for device, contiguous, sparse in reports:
            broadcast.progress(device, contiguous, contiguous, True, listening=not sparse, sparse=sparse)
        broadcast.start()
        deadline = asyncio.get_running_loop().time() + timeout
        while not broadcast.finished and asyncio.get_running_loop().time() < deadline:
            # the devices report what arrived, as agents do
            for device, contiguous, sparse in reports:
                if not sparse and sent:
                    at = max(contiguous, max(sent) + 1)
                    broadcast.progress(device, at, at, at < n, listening=True)
            await asyncio.sleep(0.01)
        broadcast.stop()

    asyncio.run(main())
    return sent


def test_the_broadcast_starts_at_the_first_chunk_the_slowest_device_lacks() -> None:
    sent = run_broadcast(100, [("holds-90", 90, False), ("holds-95", 95, False)])
    assert sent == list(range(90, 100)), "chunks every device holds are not sent again"


def test_a_device_without_the_base_gets_every_chunk() -> None:
    sent = run_broadcast(100, [("holds-90", 90, False), ("new", 0, False)])
    assert sent == list(range(100))


def test_sparse_devices_neither_hold_back_nor_keep_the_broadcast_going() -> None:
    assert run_broadcast(100, [("sparse", 97, True)]) == [], "nobody follows the broadcast: nothing is sent"
    sent = run_broadcast(100, [("sparse", 3, True), ("holds-50", 50, False)])
    assert sent == list(range(50, 100)), "the sparse device's low contiguous does not pace it"

"""Broadcasts and repairs from the database artifact store, against protocol peers on a real broker: the
broadcast reads its chunks in a worker thread, repairs prefetch theirs there, and every device gets every chunk
exactly as the signed manifest says (the peers check each one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.delivery import transfer
from tests.delivery.test_delivery import CHUNK, deploy, deployment, register_anomaly
from tests.helpers import wait_until


@pytest.fixture
def ctl(private_broker, make_controller):  # type: ignore[no-untyped-def]
    return make_controller(private_broker, chunk_size=CHUNK, artifact_store="database")


def test_broadcast_and_repairs_come_from_the_database_store(
    ctl, peers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    assert ctl.runtime.models.store.kind == "database"
    prefetched: list[int] = []
    real = transfer.ChunkSource.prefetch

    def counting(self: transfer.ChunkSource, indices: list[int]) -> None:
        prefetched.extend(indices)
        real(self, indices)

    monkeypatch.setattr(transfer.ChunkSource, "prefetch", counting)
    register_anomaly(ctl, tmp_path)
    lossy = peers("lossy", drop={0, 3, 7, 20})
    late = peers("late", ignore_broadcast=True)
    fine = peers("fine")
    dep = deploy(ctl, model="pump", version=1, variant="fp32", devices=["lossy", "late", "fine"])
    wait_until(lambda: fine.complete(), 30, what="the broadcast from the database store")
    wait_until(lambda: lossy.manifest is not None and len(lossy.chunks) == len(lossy.manifest.chunks) - 4, 30)
    assert lossy.request_missing() == [(0, 1), (3, 4), (7, 8), (20, 21)]
    late.request_missing()
    wait_until(lambda: lossy.complete() and late.complete(), 30, what="repairs from the database store")
    assert lossy.from_repair == 4 and late.from_repair == len(late.chunks) > 20
    assert {0, 3, 7, 20} <= set(prefetched), "repairs read their chunks ahead, off the MQTT loop"
    for p in (lossy, late, fine):
        assert p.bad_frames == 0
        p.finish()
    wait_until(lambda: deployment(ctl, dep["id"])["status"] == "completed", 15)

"""The ``RecordStore`` protocol (agent/deploy/record.py) against ``MemoryRecordStore`` (unit tests, virtual
fleets: the object is the device's "disk") and ``DiskRecordStore``: what is saved is what a reopened store loads,
the current and the previous manifest are kept, older ones go."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.deploy.record import DeploymentRecord, DiskRecordStore, MemoryRecordStore, PersistedState, RecordStore
from tests.agent.deploy.harness import Artifact, artifact
from wire.messages import DeployState

#: a reopen: the same store again (memory) or a new one on the same directory (disk)
Reopen = Callable[[], RecordStore]


@pytest.fixture(params=["memory", "disk"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Reopen:
    if request.param == "memory":
        store = MemoryRecordStore()
        return lambda: store
    return lambda: DiskRecordStore(tmp_path / "deploy")


def test_a_fresh_store_loads_an_empty_state(reopen: Reopen) -> None:
    state = reopen().load()
    assert state == PersistedState() and state.record is None and state.seq == 0


def test_the_saved_state_is_what_a_reopened_store_loads(reopen: Reopen) -> None:
    record = DeploymentRecord(deployment_id="d1", artifact_id="a" * 64, state=DeployState.VERIFYING, attempts={"x": 2})
    reopen().save(PersistedState(seq=7, record=record))
    loaded = reopen().load()
    assert loaded.seq == 7 and loaded.record == record
    loaded.seq = 8  # a loaded state is a copy: changing it changes nothing stored
    assert reopen().load().seq == 7


def test_the_current_and_the_previous_manifest_are_kept(reopen: Reopen, v1: Artifact, v2: Artifact, key) -> None:  # type: ignore[no-untyped-def]
    v3 = artifact(v1.files, key, version=3)
    store = reopen()
    store.save_manifest(v1.signed)
    store.save_manifest(v2.signed)
    assert reopen().load_manifest(v1.id) == v1.signed and reopen().load_manifest(v2.id) == v2.signed
    store.save_manifest(v3.signed)
    again = reopen()
    assert again.load_manifest(v3.id) == v3.signed and again.load_manifest(v2.id) == v2.signed
    assert again.load_manifest(v1.id) is None, "older manifests are dropped"
    assert again.load_manifest("0" * 64) is None and again.load_manifest("../x") is None

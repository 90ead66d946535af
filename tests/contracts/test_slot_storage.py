"""The ``SlotStorage`` protocol (agent/deploy/storage.py) against ``DiskSlotStorage`` (devices) and
``MemorySlotStorage`` (virtual fleets; with and without the bytes kept). A reopen is a new ``DiskSlotStorage`` on
the same directory, the same object in memory (the simulated disk outlives a simulated power loss)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.deploy.disk import DiskSlotStorage
from agent.deploy.errors import StorageError
from agent.deploy.memory import MemorySlotStorage
from agent.deploy.storage import SlotStorage, installed_models
from tests.agent.deploy.harness import Artifact

Reopen = Callable[[], SlotStorage]


@pytest.fixture(params=["disk", "memory", "memory-with-bytes"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Reopen:
    if request.param == "disk":
        return lambda: DiskSlotStorage(tmp_path / "device")
    store = MemorySlotStorage(keep_data=request.param == "memory-with-bytes")
    return lambda: store


def write_all(storage: SlotStorage, slot: str, art: Artifact) -> None:
    bitmap = storage.begin(slot, art.signed)
    for ref in art.manifest.chunks:
        storage.write_chunk(slot, ref, art.chunk(ref.index))
        bitmap.add(ref.index)
    storage.checkpoint(slot, bitmap.to_bytes())


def test_an_empty_storage_has_no_active_slot_and_no_models(reopen: Reopen) -> None:
    s = reopen()
    assert s.active_slot() is None and s.meta("a") is None and s.meta("b") is None and installed_models(s) == []


def test_a_written_slot_verifies_becomes_ready_and_serves_after_a_reopen(reopen: Reopen, v1: Artifact) -> None:
    s = reopen()
    write_all(s, "a", v1)
    meta = s.meta("a")
    assert meta is not None and meta.status == "writing" and meta.artifact_id == v1.id
    for index, f in enumerate(v1.manifest.files):
        assert s.file_sha256("a", index) == f.sha256
    assert all(s.chunk_sha256("a", ref) == ref.sha256 for ref in v1.manifest.chunks)
    s.mark_ready("a")
    s.set_active("a")
    again = reopen()
    assert again.active_slot() == "a"
    ready = again.meta("a")
    assert ready is not None and ready.status == "ready"
    assert [(m.slot, m.active) for m in installed_models(again)] == [("a", True)]


def test_a_download_resumes_from_its_last_checkpoint(reopen: Reopen, v1: Artifact) -> None:
    s = reopen()
    bitmap = s.begin("b", v1.signed)
    first = v1.manifest.chunks[0]
    s.write_chunk("b", first, v1.chunk(first.index))
    bitmap.add(first.index)
    s.checkpoint("b", bitmap.to_bytes())
    resumed = reopen().begin("b", v1.signed)
    assert resumed.has(first.index) and resumed.count == 1


def test_beginning_another_artifact_empties_the_slot(reopen: Reopen, v1: Artifact, v2: Artifact) -> None:
    s = reopen()
    write_all(s, "b", v1)
    assert s.begin("b", v2.signed).count == 0
    meta = reopen().meta("b")
    assert meta is not None and meta.artifact_id == v2.id and meta.status == "writing"


def test_the_active_slot_is_never_written_nor_released(reopen: Reopen, v1: Artifact, v2: Artifact) -> None:
    s = reopen()
    write_all(s, "a", v1)
    s.mark_ready("a")
    s.set_active("a")
    with pytest.raises(StorageError):
        s.begin("a", v2.signed)
    with pytest.raises(StorageError):
        s.release("a")
    with pytest.raises(StorageError):
        s.set_active("c")
    assert s.meta("a") is not None and s.active_slot() == "a"


def test_a_chunk_is_copied_from_a_ready_slot_only_when_its_hash_matches(
    reopen: Reopen, v1: Artifact, v2: Artifact
) -> None:
    s = reopen()
    write_all(s, "a", v1)
    s.mark_ready("a")
    s.begin("b", v1.signed)
    ref = v1.manifest.chunks[0]
    assert s.copy_chunk("a", ref, "b", ref)
    assert s.chunk_sha256("b", ref) == ref.sha256
    other = next(r for r in v2.manifest.chunks if r.sha256 != ref.sha256)
    assert not s.copy_chunk("a", ref, "b", other.model_copy(update={"index": ref.index}))


def test_a_released_slot_is_empty(reopen: Reopen, v1: Artifact) -> None:
    s = reopen()
    write_all(s, "b", v1)
    s.mark_ready("b")
    s.release("b")
    assert reopen().meta("b") is None and installed_models(reopen()) == []


def test_an_artifact_over_the_store_cap_is_refused_before_writing(tmp_path: Path, v1: Artifact) -> None:
    for s in (DiskSlotStorage(tmp_path, store_max_bytes=1), MemorySlotStorage(store_max_bytes=1)):
        assert "store_max_bytes" in (s.space_error(v1.manifest, "a") or "")

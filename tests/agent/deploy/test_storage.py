"""Slots on disk and in memory, the held-chunks bitmap, the record store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.deploy.bitmap import ChunkBitmap, ranges
from agent.deploy.disk import DiskSlotStorage
from agent.deploy.errors import StorageError
from agent.deploy.memory import MemorySlotStorage
from agent.deploy.record import DeploymentRecord, DiskRecordStore, PersistedState
from agent.deploy.storage import installed_models
from tests.agent.deploy.harness import Artifact
from wire.messages import DeployState


def test_bitmap_counts_the_contiguous_prefix_and_lists_what_is_missing() -> None:
    b = ChunkBitmap(20)
    for i in (0, 1, 2, 5, 6, 19):
        assert b.add(i)
    assert not b.add(5)
    assert (b.count, b.contiguous) == (6, 3)
    assert b.missing(4) == [3, 4, 7, 8] and b.missing(3, skip={3}) == [4, 7, 8]
    b.add(3)
    b.add(4)
    assert b.contiguous == 7
    b.discard(1)
    assert (b.count, b.contiguous) == (7, 1)
    again = ChunkBitmap(20, b.to_bytes())
    assert again.count == 7 and again.missing(100) == b.missing(100)
    # stray bits beyond the end in a persisted bitmap do not count as chunks
    assert ChunkBitmap(3, b"\xff").count == 3
    assert ChunkBitmap(3, b"\x00\x00").count == 0  # wrong length: nothing trusted


def test_ranges_merge_runs_and_stop_at_the_limit() -> None:
    assert ranges([5, 1, 2, 3, 9]) == [(1, 4), (5, 6), (9, 10)]
    assert ranges(list(range(0, 20, 2)), max_ranges=3) == [(0, 1), (2, 3), (4, 5)]


def test_the_active_pointer_is_replaced_atomically(tmp_path: Path) -> None:
    s = DiskSlotStorage(tmp_path)
    assert s.active_slot() is None
    s.set_active("b")
    assert s.active_slot() == "b" and (tmp_path / "slots" / "active").read_text() == "b\n"
    assert not list((tmp_path / "slots").glob(".*tmp")), "no temporary file left behind"
    s.set_active(None)
    assert s.active_slot() is None
    (tmp_path / "slots" / "active").write_text("../../etc")
    assert s.active_slot() is None, "a pointer that names no slot is not trusted"


def test_a_download_resumes_from_the_last_checkpoint_after_a_restart(tmp_path: Path, v1: Artifact) -> None:
    s = DiskSlotStorage(tmp_path)
    bitmap = s.begin("a", v1.signed)
    assert bitmap.count == 0
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "slots/a/files").iterdir()}
    assert sizes == {f.path: f.size for f in v1.manifest.files}, "files are preallocated at their final size"
    for index in (0, 1):
        s.write_chunk("a", v1.manifest.chunks[index], v1.chunk(index))
        bitmap.add(index)
    s.checkpoint("a", bitmap.to_bytes())
    s.write_chunk("a", v1.manifest.chunks[2], v1.chunk(2))  # written, not checkpointed: not trusted
    s.close()

    again = DiskSlotStorage(tmp_path)  # the agent restarted
    resumed = again.begin("a", v1.signed)
    assert resumed.count == 2 and resumed.has(0) and resumed.has(1) and not resumed.has(2)
    assert again.chunk_sha256("a", v1.manifest.chunks[1]) == v1.manifest.chunks[1].sha256


def test_a_file_of_the_wrong_size_loses_its_held_chunks(tmp_path: Path, v1: Artifact) -> None:
    s = DiskSlotStorage(tmp_path)
    bitmap = s.begin("a", v1.signed)
    for ref in v1.manifest.chunks:
        s.write_chunk("a", ref, v1.chunk(ref.index))
        bitmap.add(ref.index)
    s.checkpoint("a", bitmap.to_bytes())
    s.close()
    os.truncate(tmp_path / "slots/a/files/tokenizer.json", 10)
    resumed = DiskSlotStorage(tmp_path).begin("a", v1.signed)
    tokenizer = [r.index for r in v1.manifest.chunks if v1.manifest.files[r.file].path == "tokenizer.json"]
    assert all(not resumed.has(i) for i in tokenizer) and resumed.count == len(v1) - len(tokenizer)


def test_the_active_slot_is_never_written_or_freed(tmp_path: Path, v1: Artifact) -> None:
    s = DiskSlotStorage(tmp_path)
    s.set_active("a")
    with pytest.raises(StorageError, match="serves the active model"):
        s.begin("a", v1.signed)
    with pytest.raises(StorageError, match="serves the active model"):
        s.release("a")


def test_a_ready_slot_is_reported_installed_and_freed_on_release(tmp_path: Path, v1: Artifact, v2: Artifact) -> None:
    s = DiskSlotStorage(tmp_path)
    for slot, art in (("a", v1), ("b", v2)):
        bitmap = s.begin(slot, art.signed)
        for ref in art.manifest.chunks:
            s.write_chunk(slot, ref, art.chunk(ref.index))
            bitmap.add(ref.index)
        assert all(s.file_sha256(slot, i) == f.sha256 for i, f in enumerate(art.manifest.files))
        s.mark_ready(slot)
    s.set_active("b")
    installed = installed_models(DiskSlotStorage(tmp_path))  # read back from the slot metadata
    assert [(m.version, m.slot, m.active) for m in installed] == [(2, "b", True), (1, "a", False)]
    s.release("a")
    assert not (tmp_path / "slots/a/files").exists() and s.meta("a") is None
    assert [(m.version, m.active) for m in installed_models(s)] == [(2, True)]


def test_memory_slots_keep_hashes_only_and_detect_corruption(v1: Artifact) -> None:
    s = MemorySlotStorage()
    bitmap = s.begin("a", v1.signed)
    for ref in v1.manifest.chunks:
        s.write_chunk("a", ref, v1.chunk(ref.index))
        bitmap.add(ref.index)
    assert all(s.file_sha256("a", i) == f.sha256 for i, f in enumerate(v1.manifest.files))
    s.corrupt("a", 0)
    assert s.file_sha256("a", 0) != v1.manifest.files[0].sha256
    assert not s._slots["a"].data, "no chunk bytes kept unless asked to"


def test_the_record_store_round_trips_and_survives_a_corrupt_file(tmp_path: Path, v1: Artifact, v2: Artifact) -> None:
    store = DiskRecordStore(tmp_path)
    assert store.load().record is None
    state = PersistedState(
        seq=7, record=DeploymentRecord(deployment_id="d", artifact_id=v1.id, state=DeployState.VERIFYING)
    )
    store.save(state)
    loaded = DiskRecordStore(tmp_path).load()
    assert loaded.seq == 7 and loaded.record is not None and loaded.record.state == DeployState.VERIFYING
    store.save_manifest(v1.signed)
    store.save_manifest(v2.signed)
    assert store.load_manifest(v1.id) == v1.signed and store.load_manifest(v2.id) == v2.signed
    assert store.load_manifest("../record") is None
    (tmp_path / "record.json").write_text("{not json")
    assert DiskRecordStore(tmp_path).load().record is None

"""Slots in memory, for unit tests and simulated fleets of thousands of devices.

By default no chunk bytes are kept: a chunk is verified against its sha256 before it is written, so
a bitmap of written chunks (plus the few a scenario corrupted) says everything a simulated device
needs, at one bit per chunk. ``keep_data=True`` keeps the bytes so file hashes are computed for real.
``corrupt()`` and ``capacity_bytes`` let a simulation inject disk corruption and full disks.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from agent.deploy.bitmap import ChunkBitmap
from agent.deploy.errors import StorageError
from agent.deploy.storage import SLOTS, SlotMeta
from wire.manifest import ChunkRef, Manifest, SignedManifest

_BAD = "0" * 64


@dataclass
class _Slot:
    meta: SlotMeta | None = None
    held: bytes | None = None  # the last checkpointed bitmap
    written: ChunkBitmap | None = None  # chunks whose (verified) bytes are stored
    corrupt: set[int] = field(default_factory=set)
    data: dict[int, bytes] = field(default_factory=dict)


class MemorySlotStorage:
    """Two slots in memory (``SlotStorage``). Thread-safe."""

    def __init__(self, *, capacity_bytes: int | None = None, store_max_bytes: int = 0, keep_data: bool = False) -> None:
        self.capacity_bytes = capacity_bytes
        self.store_max_bytes = store_max_bytes
        self.keep_data = keep_data
        self._slots = {slot: _Slot() for slot in SLOTS}
        self._active: str | None = None
        self._lock = threading.Lock()
        self.writes = 0
        self.copies = 0

    def active_slot(self) -> str | None:
        return self._active

    def set_active(self, slot: str | None) -> None:
        if slot is not None and slot not in SLOTS:
            raise StorageError(f"unknown slot {slot!r}")
        self._active = slot

    def meta(self, slot: str) -> SlotMeta | None:
        return self._slots[slot].meta

    def bundle_dir(self, slot: str) -> Path | None:
        return None

    def _size(self, slot: str | None) -> int:
        meta = self._slots[slot].meta if slot is not None else None
        return meta.manifest.total_size if meta is not None else 0

    def space_error(self, manifest: Manifest, slot: str) -> str | None:
        need = max(manifest.total_size, manifest.requirements.min_disk_bytes)
        active_bytes = self._size(self._active)
        if self.store_max_bytes and active_bytes + need > self.store_max_bytes:
            return (
                f"the artifact needs {need} bytes and the active model holds {active_bytes}: together over the"
                f" model store cap of {self.store_max_bytes} bytes (store_max_bytes)"
            )
        if self.capacity_bytes is not None and active_bytes + need > self.capacity_bytes:
            return f"not enough disk space: the artifact needs {need} bytes, {self.capacity_bytes - active_bytes} free"
        return None

    def begin(self, slot: str, signed: SignedManifest) -> ChunkBitmap:
        if slot == self._active:
            raise StorageError(f"slot {slot} serves the active model; a deployment never writes into it")
        meta = SlotMeta.of("writing", signed)
        total = len(signed.manifest.chunks)
        with self._lock:
            s = self._slots[slot]
            if s.meta is not None and s.meta.artifact_id == meta.artifact_id and s.written is not None:
                bitmap = ChunkBitmap.full(total) if s.meta.status == "ready" else ChunkBitmap(total, s.held)
                s.meta = meta
                return bitmap
            self._slots[slot] = _Slot(meta=meta, written=ChunkBitmap(total))
            return ChunkBitmap(total)

    def _writable(self, slot: str) -> _Slot:
        s = self._slots[slot]
        if s.meta is None or s.meta.status != "writing" or s.written is None:
            raise StorageError(f"slot {slot} is not being written")
        return s

    def write_chunk(self, slot: str, ref: ChunkRef, data: bytes | memoryview) -> None:
        with self._lock:
            s = self._writable(slot)
            s.written.add(ref.index)  # type: ignore[union-attr]  # checked by _writable
            s.corrupt.discard(ref.index)
            if self.keep_data:
                s.data[ref.index] = bytes(data)
            self.writes += 1

    def _intact(self, s: _Slot, index: int) -> bool:
        return s.written is not None and s.written.has(index) and index not in s.corrupt

    def copy_chunk(self, src_slot: str, src: ChunkRef, dst_slot: str, dst: ChunkRef) -> bool:
        with self._lock:
            s = self._slots[src_slot]
            if s.meta is None or s.meta.status != "ready" or src.sha256 != dst.sha256 or not self._intact(s, src.index):
                return False
            d = self._writable(dst_slot)
            d.written.add(dst.index)  # type: ignore[union-attr]  # checked by _writable
            d.corrupt.discard(dst.index)
            if self.keep_data:
                d.data[dst.index] = s.data[src.index]
            self.copies += 1
        return True

    def checkpoint(self, slot: str, held: bytes) -> None:
        with self._lock:
            self._slots[slot].held = held

    def _manifest(self, slot: str) -> Manifest:
        meta = self._slots[slot].meta
        if meta is None:
            raise StorageError(f"slot {slot} is empty")
        return meta.manifest

    def file_sha256(self, slot: str, file_index: int) -> str:
        manifest = self._manifest(slot)
        refs = [ref for ref in manifest.chunks if ref.file == file_index]
        with self._lock:
            s = self._slots[slot]
            if self.keep_data:
                digest = hashlib.sha256()
                for ref in refs:
                    digest.update(s.data.get(ref.index, b"\0" * ref.size))
                return digest.hexdigest()
            intact = all(self._intact(s, ref.index) for ref in refs)
        return manifest.files[file_index].sha256 if intact else _BAD

    def chunk_sha256(self, slot: str, ref: ChunkRef) -> str:
        with self._lock:
            s = self._slots[slot]
            if self.keep_data and ref.index in s.data:
                return hashlib.sha256(s.data[ref.index]).hexdigest()
            return ref.sha256 if self._intact(s, ref.index) else _BAD

    def mark_ready(self, slot: str) -> None:
        with self._lock:
            s = self._slots[slot]
            if s.meta is None:
                raise StorageError(f"slot {slot} is empty; nothing to mark ready")
            s.meta = s.meta.model_copy(update={"status": "ready"})
            s.held = None

    def release(self, slot: str) -> None:
        if slot == self._active:
            raise StorageError(f"slot {slot} serves the active model; it cannot be freed")
        with self._lock:
            self._slots[slot] = _Slot()

    def corrupt(self, slot: str, index: int) -> None:
        """Fault injection: the stored chunk ``index`` of ``slot`` no longer matches its hash."""
        with self._lock:
            s = self._slots[slot]
            s.corrupt.add(index)
            if index in s.data:
                s.data[index] = bytes([s.data[index][0] ^ 0xFF]) + s.data[index][1:]

"""Slots as directories on the device: ``slots/a`` and ``slots/b`` under the deployment root.

::

    <root>/slots/active          pointer: "a" or "b", replaced with one atomic rename
    <root>/slots/<slot>/meta.json      status (writing | ready) and the signed manifest
    <root>/slots/<slot>/held.bin       while writing: artifact id (32 bytes) + held-chunks bitmap
    <root>/slots/<slot>/files/<path>   the bundle, preallocated, chunks written at their offsets

A held bit is recorded only after its chunk's bytes were fsynced (``checkpoint``), so a resumed
download never trusts a chunk that did not reach the disk; at worst it fetches the last second again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from agent.deploy.bitmap import ChunkBitmap
from agent.deploy.errors import StorageError
from agent.deploy.fsutil import atomic_write, durable_unlink, fsync_dir
from agent.deploy.ids import artifact_id
from agent.deploy.storage import SLOTS, SlotMeta
from wire.manifest import ChunkRef, Manifest, SignedManifest

log = logging.getLogger(__name__)

_BLOCK = 1024 * 1024


@dataclass
class _Open:
    manifest: Manifest
    artifact_id: str
    fds: dict[int, int] = field(default_factory=dict)  # file index -> fd
    dirs: set[Path] = field(default_factory=set)


def _describe(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {exc.strerror} ({exc.filename or ''})"
    return f"{exc.strerror or exc} ({exc.filename or ''})"


class DiskSlotStorage:
    """Two slots on the local file system (``SlotStorage``)."""

    def __init__(self, root: Path, *, store_max_bytes: int = 0, reserve_bytes: int = 16 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.slots_dir = self.root / "slots"
        self.pointer = self.slots_dir / "active"
        self.store_max_bytes = store_max_bytes
        self.reserve_bytes = reserve_bytes
        for slot in SLOTS:
            (self.slots_dir / slot).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}
        self._meta: dict[str, SlotMeta | None] = {}

    # ------------------------------------------------------------ paths --

    def slot_dir(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise StorageError(f"unknown slot {slot!r}")
        return self.slots_dir / slot

    def bundle_dir(self, slot: str) -> Path:
        return self.slot_dir(slot) / "files"

    def _file_path(self, slot: str, manifest: Manifest, file_index: int) -> Path:
        base = self.bundle_dir(slot)
        path = base / manifest.files[file_index].path
        # The manifest's paths are validated as safe relative paths; check again where it matters.
        if base.resolve() not in path.resolve().parents:
            raise StorageError(f"file path {manifest.files[file_index].path!r} leaves the bundle directory")
        return path

    # ---------------------------------------------------------- pointer --

    def active_slot(self) -> str | None:
        try:
            value = self.pointer.read_text().strip()
        except FileNotFoundError:
            return None
        if value not in SLOTS:
            log.error("active pointer %s holds %r; treating it as unset", self.pointer, value)
            return None
        return value

    def set_active(self, slot: str | None) -> None:
        if slot is None:
            durable_unlink(self.pointer)
            return
        self.slot_dir(slot)
        atomic_write(self.pointer, f"{slot}\n".encode())

    # ------------------------------------------------------------- meta --

    def meta(self, slot: str) -> SlotMeta | None:
        with self._lock:
            if slot in self._meta:
                return self._meta[slot]
        path = self.slot_dir(slot) / "meta.json"
        try:
            meta: SlotMeta | None = SlotMeta.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            meta = None
        except (ValidationError, ValueError) as exc:
            log.error("slot %s: unreadable metadata %s (%s); treating the slot as empty", slot, path, exc)
            meta = None
        with self._lock:
            self._meta[slot] = meta
        return meta

    def _write_meta(self, slot: str, meta: SlotMeta | None) -> None:
        path = self.slot_dir(slot) / "meta.json"
        if meta is None:
            durable_unlink(path)
        else:
            atomic_write(path, meta.model_dump_json().encode())
        with self._lock:
            self._meta[slot] = meta

    # ------------------------------------------------------------ space --

    def _used_bytes(self, slot: str) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.bundle_dir(slot)):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
        return total

    def space_error(self, manifest: Manifest, slot: str) -> str | None:
        need = max(manifest.total_size, manifest.requirements.min_disk_bytes)
        active = self.active_slot()
        active_meta = self.meta(active) if active is not None else None
        active_bytes = active_meta.manifest.total_size if active_meta is not None else 0
        if self.store_max_bytes and active_bytes + need > self.store_max_bytes:
            return (
                f"the artifact needs {need} bytes and the active model holds {active_bytes}: together over the"
                f" model store cap of {self.store_max_bytes} bytes (store_max_bytes); raise the cap or deploy a"
                " smaller variant"
            )
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            return f"cannot measure free space under {self.root}: {_describe(exc)}"
        # What the slot holds now is freed (another artifact) or reused (the same one, preallocated).
        held = self._used_bytes(slot)
        available = free + held - self.reserve_bytes
        if need > available:
            return (
                f"not enough disk space: the artifact needs {need} bytes, {max(available, 0)} are available under"
                f" {self.root} (free {free}, reusable {held}, reserve {self.reserve_bytes}); free some space"
            )
        return None

    # ---------------------------------------------------------- writing --

    def begin(self, slot: str, signed: SignedManifest) -> ChunkBitmap:
        if slot == self.active_slot():
            raise StorageError(f"slot {slot} serves the active model; a deployment never writes into it")
        manifest = signed.manifest
        artifact = artifact_id(manifest)
        meta = self.meta(slot)
        self._close(slot)
        try:
            if meta is not None and meta.artifact_id == artifact:
                if meta.status == "writing":
                    bitmap = self._held(slot, manifest, artifact)
                else:  # complete already (a cancelled candidate, a repeated deployment): verify it again
                    bitmap = ChunkBitmap.full(len(manifest.chunks))
                    self._write_meta(slot, SlotMeta.of("writing", signed))
            else:
                # Metadata first: a crash while emptying leaves a slot that says "writing, nothing held".
                self._write_meta(slot, SlotMeta.of("writing", signed))
                durable_unlink(self.slot_dir(slot) / "held.bin")
                shutil.rmtree(self.bundle_dir(slot), ignore_errors=True)
                bitmap = ChunkBitmap(len(manifest.chunks))
            self._allocate(slot, manifest, artifact, bitmap)
        except OSError as exc:
            self._close(slot)
            raise StorageError(f"cannot prepare slot {slot}: {_describe(exc)}") from exc
        return bitmap

    def _held(self, slot: str, manifest: Manifest, artifact: str) -> ChunkBitmap:
        try:
            raw = (self.slot_dir(slot) / "held.bin").read_bytes()
        except FileNotFoundError:
            return ChunkBitmap(len(manifest.chunks))
        if raw[:32] != bytes.fromhex(artifact):
            return ChunkBitmap(len(manifest.chunks))
        return ChunkBitmap(len(manifest.chunks), raw[32:])

    def _allocate(self, slot: str, manifest: Manifest, artifact: str, bitmap: ChunkBitmap) -> None:
        opened = _Open(manifest, artifact)
        self.bundle_dir(slot).mkdir(parents=True, exist_ok=True)
        try:
            for index, entry in enumerate(manifest.files):
                path = self._file_path(slot, manifest, index)
                path.parent.mkdir(parents=True, exist_ok=True)
                opened.dirs.add(path.parent)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                opened.fds[index] = fd
                if os.fstat(fd).st_size != entry.size:
                    # A file of the wrong size cannot hold the chunks the bitmap says it does.
                    for ref in manifest.chunks:
                        if ref.file == index:
                            bitmap.discard(ref.index)
                    os.ftruncate(fd, entry.size)
                if entry.size and hasattr(os, "posix_fallocate"):
                    # Reserve the blocks now: running out of space fails here, not half-way through.
                    os.posix_fallocate(fd, 0, entry.size)
        except BaseException:
            for fd in opened.fds.values():
                os.close(fd)
            raise
        with self._lock:
            self._open[slot] = opened

    def _fd(self, slot: str, file_index: int) -> int:
        with self._lock:
            opened = self._open.get(slot)
            if opened is None:
                raise StorageError(f"slot {slot} is not being written")
            return opened.fds[file_index]

    def write_chunk(self, slot: str, ref: ChunkRef, data: bytes | memoryview) -> None:
        fd = self._fd(slot, ref.file)
        view = memoryview(data)
        offset = ref.offset
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise StorageError(f"cannot write chunk {ref.index} to slot {slot}: {_describe(exc)}") from exc

    def _read(self, slot: str, manifest: Manifest, ref: ChunkRef) -> bytes:
        with open(self._file_path(slot, manifest, ref.file), "rb") as f:
            f.seek(ref.offset)
            return f.read(ref.size)

    def copy_chunk(self, src_slot: str, src: ChunkRef, dst_slot: str, dst: ChunkRef) -> bool:
        meta = self.meta(src_slot)
        if meta is None or meta.status != "ready" or src.sha256 != dst.sha256:
            return False
        try:
            data = self._read(src_slot, meta.manifest, src)
        except OSError:
            return False
        if hashlib.sha256(data).hexdigest() != dst.sha256:
            return False  # the installed copy rotted; fetch this chunk instead
        self.write_chunk(dst_slot, dst, data)
        return True

    def checkpoint(self, slot: str, held: bytes) -> None:
        with self._lock:
            opened = self._open.get(slot)
            fds = list(opened.fds.values()) if opened else []
            dirs = set(opened.dirs) if opened else set()
            artifact = opened.artifact_id if opened else None
        if artifact is None:
            return
        try:
            for fd in fds:
                os.fsync(fd)
            for d in dirs:
                fsync_dir(d)
            atomic_write(self.slot_dir(slot) / "held.bin", bytes.fromhex(artifact) + held)
        except OSError as exc:
            raise StorageError(f"cannot checkpoint slot {slot}: {_describe(exc)}") from exc

    # -------------------------------------------------------- verifying --

    def _manifest(self, slot: str) -> Manifest:
        with self._lock:
            opened = self._open.get(slot)
        if opened is not None:
            return opened.manifest
        meta = self.meta(slot)
        if meta is None:
            raise StorageError(f"slot {slot} is empty")
        return meta.manifest

    def file_sha256(self, slot: str, file_index: int) -> str:
        manifest = self._manifest(slot)
        digest = hashlib.sha256()
        try:
            with open(self._file_path(slot, manifest, file_index), "rb") as f:
                while block := f.read(_BLOCK):
                    digest.update(block)
        except OSError as exc:
            raise StorageError(f"cannot read slot {slot}: {_describe(exc)}") from exc
        return digest.hexdigest()

    def chunk_sha256(self, slot: str, ref: ChunkRef) -> str:
        try:
            return hashlib.sha256(self._read(slot, self._manifest(slot), ref)).hexdigest()
        except OSError as exc:
            raise StorageError(f"cannot read slot {slot}: {_describe(exc)}") from exc

    def mark_ready(self, slot: str) -> None:
        meta = self.meta(slot)
        if meta is None:
            raise StorageError(f"slot {slot} is empty; nothing to mark ready")
        with self._lock:
            opened = self._open.pop(slot, None)
        try:
            if opened is not None:
                for fd in opened.fds.values():
                    os.fsync(fd)
                    os.close(fd)
                for d in opened.dirs:
                    fsync_dir(d)
            self._write_meta(slot, meta.model_copy(update={"status": "ready"}))
            durable_unlink(self.slot_dir(slot) / "held.bin")
        except OSError as exc:
            raise StorageError(f"cannot finish slot {slot}: {_describe(exc)}") from exc

    def release(self, slot: str) -> None:
        if slot == self.active_slot():
            raise StorageError(f"slot {slot} serves the active model; it cannot be freed")
        self._close(slot)
        # Metadata first: an interrupted removal leaves an empty slot, not a half-deleted "ready" one.
        self._write_meta(slot, None)
        durable_unlink(self.slot_dir(slot) / "held.bin")
        shutil.rmtree(self.bundle_dir(slot), ignore_errors=True)

    def _close(self, slot: str) -> None:
        with self._lock:
            opened = self._open.pop(slot, None)
        if opened is not None:
            for fd in opened.fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def close(self) -> None:
        """Close every open file (the agent stops)."""
        for slot in SLOTS:
            self._close(slot)

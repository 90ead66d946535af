"""The two model slots behind a small interface: files on disk on devices, hashes in memory in simulations.

A slot holds one artifact's files. Its metadata says which artifact and whether it is complete
(``ready``: files verified and self-tested) or being written (``writing``). The ``active`` pointer names
the slot that serves; it changes with one atomic rename. A deployment always writes into the slot that
is not active, so the serving model is never touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel

from agent.deploy.bitmap import ChunkBitmap
from agent.deploy.ids import artifact_id
from wire.manifest import ChunkRef, Manifest, SignedManifest
from wire.messages import InstalledModel

SLOTS = ("a", "b")


def other_slot(slot: str | None) -> str:
    """The slot a deployment writes to when ``slot`` serves (``a`` when none does)."""
    return "b" if slot == "a" else "a"


class SlotMeta(BaseModel):
    """What a slot holds."""

    status: Literal["writing", "ready"]
    artifact_id: str
    signed: SignedManifest

    @classmethod
    def of(cls, status: Literal["writing", "ready"], signed: SignedManifest) -> SlotMeta:
        return cls(status=status, artifact_id=artifact_id(signed.manifest), signed=signed)

    @property
    def manifest(self) -> Manifest:
        return self.signed.manifest

    def installed(self, slot: str, active: bool) -> InstalledModel:
        m = self.signed.manifest
        return InstalledModel(
            model=m.model, version=m.version, variant=m.variant, artifact=self.artifact_id, slot=slot, active=active
        )


class SlotStorage(Protocol):
    """Where artifacts are written, verified and switched. Chunk writes come from the network thread;
    everything else from the deployment worker thread (implementations lock what they share)."""

    def active_slot(self) -> str | None:
        """The slot the pointer names, or None."""
        ...

    def set_active(self, slot: str | None) -> None:
        """Point at ``slot`` (atomically and durably)."""
        ...

    def meta(self, slot: str) -> SlotMeta | None: ...

    def space_error(self, manifest: Manifest, slot: str) -> str | None:
        """Why ``manifest`` does not fit into ``slot`` (store cap, free space), or None when it does."""
        ...

    def begin(self, slot: str, signed: SignedManifest) -> ChunkBitmap:
        """Make ``slot`` ready to receive ``signed``'s chunks; return the chunks it already holds.

        Resumes when the slot already holds (part of) the same artifact; otherwise empties it first.
        Raises StorageError (disk full, slot serving).
        """
        ...

    def write_chunk(self, slot: str, ref: ChunkRef, data: bytes | memoryview) -> None:
        """Write one verified chunk at its offset (not yet durable: see ``checkpoint``)."""
        ...

    def copy_chunk(self, src_slot: str, src: ChunkRef, dst_slot: str, dst: ChunkRef) -> bool:
        """Copy a chunk with the same sha256 from another slot, checking the bytes read; True when copied."""
        ...

    def checkpoint(self, slot: str, held: bytes) -> None:
        """Make the chunks written so far durable, then record ``held`` (a bitmap snapshot) as held."""
        ...

    def file_sha256(self, slot: str, file_index: int) -> str: ...

    def chunk_sha256(self, slot: str, ref: ChunkRef) -> str: ...

    def mark_ready(self, slot: str) -> None:
        """The slot's files are verified: it may be switched to and reported as installed."""
        ...

    def release(self, slot: str) -> None:
        """Free a slot that does not serve (after a Commit)."""
        ...

    def bundle_dir(self, slot: str) -> Path | None:
        """The directory a pipeline loads the slot's files from (None where there are no files)."""
        ...


def installed_models(storage: SlotStorage) -> list[InstalledModel]:
    """The truth for the birth message: the active slot's model, then a ready inactive one."""
    active = storage.active_slot()
    out: list[InstalledModel] = []
    for slot in SLOTS:
        meta = storage.meta(slot)
        if meta is None:
            continue
        if slot == active:
            out.insert(0, meta.installed(slot, True))
        elif meta.status == "ready":
            out.append(meta.installed(slot, False))
    return out

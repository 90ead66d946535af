"""Carrying out the manager's jobs on a SlotStorage and ModelOps (in the driver's worker thread)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.deploy.actions import (
    Checkpoint,
    Checkpointed,
    Discard,
    Job,
    Prepare,
    Prepared,
    Release,
    Released,
    Result,
    Serve,
    Served,
    ShadowReport,
    StartShadow,
    StopShadow,
    Switch,
    Switched,
    Verified,
    Verify,
)
from agent.deploy.bitmap import ChunkBitmap
from agent.deploy.errors import DeployError
from agent.deploy.modelops import ModelOps
from agent.deploy.storage import SlotStorage
from wire.manifest import ChunkRef

log = logging.getLogger(__name__)


class JobRunner:
    """Runs one job at a time; ``report`` receives results that come later (a shadow run's end)."""

    def __init__(self, storage: SlotStorage, ops: ModelOps) -> None:
        self.storage = storage
        self.ops = ops
        self.report: Callable[[Result], None] = lambda result: None

    def run(self, job: Job) -> Result | None:
        """The job's result, or None for jobs nobody waits for. Never raises for expected failures."""
        if isinstance(job, Prepare):
            return self._prepare(job)
        if isinstance(job, Checkpoint):
            try:
                self.storage.checkpoint(job.slot, job.held)
            except (DeployError, OSError) as exc:
                return Checkpointed(job.token, str(exc))
            return None
        if isinstance(job, Verify):
            return self._verify(job)
        if isinstance(job, Switch):
            return self._switch(job)
        if isinstance(job, Serve):
            try:
                self.ops.serve(self.ops.load_for_serving(job.slot, job.signed))
            except Exception as exc:
                return Served(job.token, False, str(exc))
            return Served(job.token, True)
        if isinstance(job, StartShadow):
            self.ops.start_shadow(job.token, job.slot, job.signed, job.spec, self.report)
            return None
        if isinstance(job, StopShadow):
            self.ops.stop_shadow(job.token)
            return None
        if isinstance(job, Discard):
            self.ops.discard(job.slot)
            return None
        if isinstance(job, Release):
            self.ops.discard(job.slot)
            try:
                self.storage.release(job.slot)
            except (DeployError, OSError) as exc:
                return Released(job.token, str(exc))
            return Released(job.token)
        raise TypeError(f"unknown job {job!r}")  # pragma: no cover

    def _prepare(self, job: Prepare) -> Prepared:
        manifest = job.signed.manifest
        try:
            bitmap = self.storage.begin(job.slot, job.signed)
            for index in job.discard:
                bitmap.discard(index)
            copied = 0
            source = self.storage.meta(job.source_slot) if job.source_slot not in (None, job.slot) else None
            if job.source_slot is not None and source is not None and source.status == "ready":
                # Delta for free: a chunk with the same sha256 is the same bytes, wherever it sits.
                by_hash = {ref.sha256: ref for ref in source.manifest.chunks}
                for ref in manifest.chunks:
                    src = by_hash.get(ref.sha256)
                    if (
                        src is not None
                        and src.size == ref.size
                        and not bitmap.has(ref.index)
                        and self.storage.copy_chunk(job.source_slot, src, job.slot, ref)
                    ):
                        bitmap.add(ref.index)
                        copied += 1
            self.storage.checkpoint(job.slot, bitmap.to_bytes())
        except (DeployError, OSError) as exc:
            return Prepared(job.token, None, error=str(exc))
        if copied:
            log.info(
                "slot %s: %d of %d chunks copied from slot %s", job.slot, copied, len(manifest.chunks), job.source_slot
            )
        return Prepared(job.token, bitmap, copied)

    def _verify(self, job: Verify) -> Verified:
        manifest = job.signed.manifest
        fresh = ChunkBitmap(len(manifest.chunks), job.fresh) if job.fresh else None
        try:
            bad: list[int] = []
            corrupt: list[int] = []
            for index, entry in enumerate(manifest.files):
                refs = [ref for ref in manifest.chunks if ref.file == index]
                if not covers(refs, entry.size):  # the file's sha256 decides
                    if self.storage.file_sha256(job.slot, index) != entry.sha256:
                        bad.append(index)
                        corrupt += [r.index for r in refs if self.storage.chunk_sha256(job.slot, r) != r.sha256]
                    continue
                # The chunks tile the file and each is bound to it by the signed manifest: a file whose every
                # chunk matches is the file. Read back only what this process did not check on arrival.
                rotten = [
                    r.index
                    for r in refs
                    if not (fresh is not None and fresh.has(r.index))
                    and self.storage.chunk_sha256(job.slot, r) != r.sha256
                ]
                if rotten:
                    bad.append(index)
                    corrupt += rotten
            if bad:
                names = ", ".join(manifest.files[i].path for i in bad[:5])
                if corrupt:
                    return Verified(job.token, False, f"{names}: sha256 mismatch after assembly", tuple(corrupt))
                return Verified(job.token, False, f"{names}: sha256 mismatch although every chunk matches")
        except (DeployError, OSError) as exc:
            return Verified(job.token, False, f"cannot verify the files: {exc}")
        report = self.ops.self_test(job.slot, job.signed, job.keep)
        if not report.ok:
            return Verified(job.token, False, report.reason, metrics=report.metrics)
        try:
            self.storage.mark_ready(job.slot)
        except (DeployError, OSError) as exc:
            self.ops.discard(job.slot)
            return Verified(job.token, False, f"cannot finish the slot: {exc}")
        return Verified(job.token, True, metrics=report.metrics)

    def _switch(self, job: Switch) -> Switched:
        if job.slot is not None:
            meta = self.storage.meta(job.slot)
            if meta is None or meta.status != "ready":
                return Switched(job.token, False, f"slot {job.slot} holds no verified model")
        try:
            # Load first: until the pointer moves nothing has changed, so a model that does not load
            # leaves the device exactly as it was.
            handle = self.ops.load_for_serving(job.slot, job.signed)
        except Exception as exc:
            return Switched(job.token, False, f"cannot load the model: {exc}")
        try:
            self.storage.set_active(job.slot)
        except (DeployError, OSError) as exc:
            return Switched(job.token, False, f"cannot switch the active pointer: {exc}")
        self.ops.serve(handle)
        log.info("switched to slot %s (%s)", job.slot, job.purpose)
        return Switched(job.token, True)


def covers(refs: list[ChunkRef], size: int) -> bool:
    """True when ``refs`` (one file's chunks) tile ``[0, size)`` exactly, in order, with no gap or overlap."""
    if not refs:
        return False  # an empty file (or one without chunks): hashed whole, which costs nothing
    end = 0
    for ref in sorted(refs, key=lambda r: r.offset):
        if ref.offset != end:
            return False
        end += ref.size
    return end == size


def failure(job: Job, reason: str) -> Result | None:
    """The result that tells the manager a job crashed unexpectedly (a bug, not the model's fault)."""
    if isinstance(job, Prepare):
        return Prepared(job.token, None, error=reason)
    if isinstance(job, Checkpoint):
        return Checkpointed(job.token, reason)
    if isinstance(job, Verify):
        return Verified(job.token, False, reason)
    if isinstance(job, Switch):
        return Switched(job.token, False, reason)
    if isinstance(job, Serve):
        return Served(job.token, False, reason)
    if isinstance(job, StartShadow):
        return ShadowReport(job.token, {}, reason)
    if isinstance(job, Release):
        return Released(job.token, reason)
    return None

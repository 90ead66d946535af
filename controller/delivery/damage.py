"""Devices' reports of chunks that arrived damaged, and what they add up to."""

from __future__ import annotations

import logging

from controller.delivery.transfer import ChunkSource, ChunkUnavailable
from controller.metrics import Metrics

log = logging.getLogger(__name__)

#: device reports of one chunk arriving damaged (all devices together) that make the controller re-check its copy
BAD_REPORTS_RECHECK = 3
#: reports by one device of one chunk arriving damaged, its store copy intact, that end its deployment
BAD_REPORTS_GIVE_UP = 10
#: counts kept at most (bounded memory: old reports are worth less than a stable controller)
MAX_COUNTS = 100_000


class DamageReports:
    """Counts reports per (artifact, chunk) and per (device, artifact, chunk)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._bad_chunks: dict[tuple[str, int], int] = {}
        self._bad_by_device: dict[tuple[str, str, int], int] = {}

    def judge(self, device_id: str, source: ChunkSource, bad: list[int]) -> ChunkUnavailable | str | None:
        """A device says chunks arrived damaged. Repeated reports of one chunk make the controller check its own
        copy: a damaged one is returned (the artifact must stop). A device that gets an intact chunk damaged
        again and again gets the reason to give it up (instead of looping until its timeout). None: serve it."""
        artifact_id = source.artifact_id
        self.metrics.chunk_bad_reports.inc(len(bad))
        if len(self._bad_chunks) > MAX_COUNTS:
            self._bad_chunks.clear()
            self._bad_by_device.clear()
        for index in bad:
            if index >= len(source):
                continue
            total = self._bad_chunks[(artifact_id, index)] = self._bad_chunks.get((artifact_id, index), 0) + 1
            mine = self._bad_by_device.get((device_id, artifact_id, index), 0) + 1
            self._bad_by_device[(device_id, artifact_id, index)] = mine
            if total % BAD_REPORTS_RECHECK == 0:
                try:
                    source.frame(index, recheck=True)
                except ChunkUnavailable as exc:
                    return exc
                if total == BAD_REPORTS_RECHECK:
                    log.warning(
                        "chunk %d of artifact %s arrived damaged %d times though the controller's copy is intact:"
                        " something between the controller and the devices corrupts data",
                        index,
                        artifact_id[:12],
                        total,
                    )
            if mine >= BAD_REPORTS_GIVE_UP:
                path = source.manifest.files[source.manifest.chunks[index].file].path
                return (
                    f"chunk {index} of {path} arrived damaged {mine} times though the controller's copy is intact:"
                    " the broker, the network or this device's memory corrupts data"
                )
        return None

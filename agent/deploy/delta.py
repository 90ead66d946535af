"""Updates as deltas: a device that already holds most of an artifact fetches only what it lacks.

Chunks are content-addressed (``wire.manifest.ChunkRef``: fixed offsets, sha256 each), so when a new version
keeps most of its bytes where the installed one had them (a fine-tuned head, a new tokenizer: measured by
``python -m benchmarks delta``), ``jobs.JobRunner._prepare`` copies every chunk whose sha256 the installed
slot holds, checking each copied chunk's bytes against the signed manifest, and the result is verified file
by file (VERIFYING) before it can be loaded, like any download.

What is left decides how the rest travels: following the broadcast would receive every chunk from the first
missing one on (the broadcast serves the whole fleet), so a device that lacks at most
``DeployConfig.sparse_fraction`` of the artifact's bytes goes **sparse**: it does not subscribe to the
broadcast, says so in its progress (``DeploymentEvent.sparse``: the controller's broadcast does not wait for
it) and asks for exactly its missing chunks with ``ChunkRequest`` (sent to it alone). A device without the
base copies nothing and follows the broadcast for the full artifact.
"""

from __future__ import annotations

from agent.deploy.bitmap import ChunkBitmap
from wire.manifest import Manifest


def missing_bytes(manifest: Manifest, bitmap: ChunkBitmap) -> int:
    """Bytes of the chunks ``bitmap`` does not hold."""
    return sum(ref.size for ref in manifest.chunks if not bitmap.has(ref.index))


def goes_sparse(manifest: Manifest, bitmap: ChunkBitmap, copied: int, fraction: float) -> bool:
    """Whether a download that copied ``copied`` chunks from the installed model should ask for the rest alone."""
    if copied <= 0 or bitmap.complete:
        return False
    total = manifest.total_size
    return total > 0 and missing_bytes(manifest, bitmap) <= fraction * total

"""Updates as deltas: a device that already holds most of an artifact fetches only what it lacks.

Chunks are content-addressed (``wire.manifest.ChunkRef``: fixed offsets, sha256 each), so when a new version
keeps most of its bytes where the installed one had them (a fine-tuned head, a new tokenizer: measured by
``python -m benchmarks delta``), ``jobs.JobRunner._prepare`` copies every chunk whose sha256 the installed
slot holds, checking each copied chunk's bytes against the signed manifest, and the result is verified file
by file (VERIFYING) before it can be loaded, like any download.

What is left decides how the rest travels. One broadcast serves the whole fleet, and it starts at the first
chunk the slowest device lacks (``controller/delivery/transfer.py``), so when the missing chunks are (nearly)
the artifact's tail, as for DistilBERT's fine-tuned head in int8 (its last 3 chunks of 258) or a new
tokenizer (its own file, sorted after the graph), following the broadcast costs every device the same few
chunks and the controller one copy. When they are scattered (the fp32 head: 10 chunks from chunk 364 of
1,023; a rotted chunk of the installed model; a changed file at the front), following the broadcast would
mean receiving everything after the first one: a device that lacks at most ``DeployConfig.sparse_fraction``
of the artifact's bytes and would receive over ``TAIL_SLACK`` times those bytes from the broadcast goes
**sparse**: it does not subscribe to the broadcast, says so in its progress (``DeploymentEvent.sparse``: the
broadcast neither waits for it nor runs for it) and asks for exactly its missing chunks with
``ChunkRequest`` (sent to it alone; the controller then sends them once per device). A device without the
base copies nothing and follows the broadcast for the full artifact.
"""

from __future__ import annotations

from agent.deploy.bitmap import ChunkBitmap
from wire.manifest import Manifest

#: a device follows the broadcast when what it would receive from its first missing chunk on is at most this many
#: times the bytes it lacks
TAIL_SLACK = 4.0


def missing_bytes(manifest: Manifest, bitmap: ChunkBitmap) -> int:
    """Bytes of the chunks ``bitmap`` does not hold."""
    return sum(ref.size for ref in manifest.chunks if not bitmap.has(ref.index))


def sparse_is_better(sizes: list[int], held: list[bool], fraction: float) -> bool:
    """Given each chunk's size and whether it is held: ask for the missing chunks alone rather than follow the
    broadcast (few missing, and scattered rather than a tail)."""
    total = sum(sizes)
    missing = sum(size for size, have in zip(sizes, held, strict=True) if not have)
    if missing == 0 or missing > fraction * total:
        return False
    first = held.index(False)
    return sum(sizes[first:]) > TAIL_SLACK * missing


def goes_sparse(manifest: Manifest, bitmap: ChunkBitmap, copied: int, fraction: float) -> bool:
    """Whether a download that copied ``copied`` chunks from the installed model should ask for the rest alone."""
    if copied <= 0:
        return False
    sizes = [ref.size for ref in manifest.chunks]
    return sparse_is_better(sizes, [bitmap.has(ref.index) for ref in manifest.chunks], fraction)

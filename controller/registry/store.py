"""The content-addressed artifact store: every file is kept once, under its sha256.

``ArtifactStore`` is what the registry, the delivery and the integrity checks use of it; two backends:

- ``ContentStore`` (this module): a directory, ``<data_dir>/registry/store`` (``artifact_store = "local"``), or
  a directory every replica mounts (``artifact_store = "/path"``, ``shared``). Writes are atomic (temporary
  file in the store, fsync, rename, fsync of the directory), so a crash leaves either a complete blob or
  nothing; a blob is never half-written under its final name, and two replicas writing the same content
  at once both rename a complete copy of the same bytes over the same name: harmless.
- ``DatabaseStore`` (``controller.registry.dbstore``): rows of the controller's database
  (``artifact_store = "database"``), which every replica reaches.

In a shared store other replicas may be writing while this one starts: their temporary files and the blobs
of an import they have not committed yet are left alone (``SHARED_GRACE_S``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

_COPY_BLOCK = 1024 * 1024
#: in a shared store, what is younger than this may be another replica's import in progress: never collected
SHARED_GRACE_S = 24 * 3600.0


def sha256_file(path: Path) -> str:
    """The sha256 (hex) of a file's content, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class BlobMissing(KeyError):
    """A blob the database refers to is not in the store."""


class ArtifactStore(Protocol):
    """Blobs under their sha256: what every backend promises (``tests/contracts/test_artifact_store.py``)."""

    #: "local", "shared directory" or "database"
    kind: str
    #: other replicas use it too (garbage collection spares what is younger than SHARED_GRACE_S)
    shared: bool

    def has(self, sha256: str) -> bool: ...

    def put_file(self, src: Path, replace: bool = False) -> tuple[str, int]:
        """Store the file at ``src``: (sha256, size). Identical content is kept once; ``replace``: overwrite the
        store's (damaged) copy."""
        ...

    def put_file_chunked(self, src: Path, chunk_size: int) -> tuple[str, int, list[str]]:
        """Store ``src``, hashing it in ``chunk_size`` pieces too: (sha256, size, chunk hashes)."""
        ...

    def put_bytes(self, data: bytes) -> str: ...

    def read(self, sha256: str) -> bytes:
        """The whole blob; BlobMissing when the store has none."""
        ...

    def read_range(self, sha256: str, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` (fewer at the end); BlobMissing when the store has none."""
        ...

    def check(self, sha256: str, size: int) -> str | None:
        """Why the blob is not what its name says (missing, wrong size, wrong content), or None when it is."""
        ...

    def list_blobs(self, older_than_s: float = 0.0) -> list[str]:
        """The sha256 of every blob stored (or stored again) more than ``older_than_s`` ago."""
        ...

    def delete(self, sha256: str) -> bool: ...

    def clean_tmp(self) -> int:
        """Remove leftovers of interrupted writes (at start-up); in a shared store only old ones."""
        ...

    def where(self, sha256: str) -> str:
        """Where the blob lives, for messages."""
        ...

    def close(self) -> None:
        """Release what the store holds open (at stop)."""
        ...


class ContentStore:
    """The directory backend: ``blobs/ab/cd/<sha256>``, temporary files in ``tmp/``."""

    def __init__(self, root: Path, shared: bool = False) -> None:
        self.root = root
        self.shared = shared
        self.kind = "shared directory" if shared else "local"
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def where(self, sha256: str) -> str:
        return str(self.path(sha256))

    def close(self) -> None:
        """Nothing held open."""

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.blobs / sha256[:2] / sha256[2:4] / sha256

    def has(self, sha256: str) -> bool:
        try:
            return self.path(sha256).is_file()
        except ValueError:
            return False

    def put_file(self, src: Path, replace: bool = False) -> tuple[str, int]:
        """Store the file at ``src``; returns (sha256, size). Identical content is stored once (``replace``:
        the copy in the store is overwritten, to repair a damaged blob with a good one)."""
        with open(src, "rb") as f:
            return self.put_stream(f, replace)

    def put_file_chunked(self, src: Path, chunk_size: int) -> tuple[str, int, list[str]]:
        """Store ``src`` and hash it in ``chunk_size`` pieces in the same pass: (sha256, size, chunk hashes)."""
        chunk_hashes: list[str] = []

        class _Chunker:
            def __init__(self, f: BinaryIO) -> None:
                self.f = f

            def read(self, n: int) -> bytes:
                block = self.f.read(chunk_size)
                if block:
                    chunk_hashes.append(hashlib.sha256(block).hexdigest())
                return block

        with open(src, "rb") as f:
            sha, size = self.put_stream(_Chunker(f))  # type: ignore[arg-type]
        return sha, size, chunk_hashes

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self.has(sha):
            self._touch(self.path(sha))
            return sha
        with self._atomic(sha) as out:
            out.write(data)
        return sha

    def put_stream(self, stream: BinaryIO, replace: bool = False) -> tuple[str, int]:
        """Store what ``stream`` holds under its sha256; ``replace``: also over an existing (damaged) blob."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        try:
            with os.fdopen(fd, "wb") as out:
                while block := stream.read(_COPY_BLOCK):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            final = self.path(sha)
            if final.is_file() and not replace:
                os.unlink(tmp_name)
                self._touch(final)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp_name, final)
                _fsync_dir(final.parent)
            return sha, size
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise

    @contextmanager
    def _atomic(self, sha256: str) -> Iterator[BinaryIO]:
        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        try:
            with os.fdopen(fd, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, final)
            _fsync_dir(final.parent)
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise

    def read(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise BlobMissing(sha256) from None

    def check(self, sha256: str, size: int) -> str | None:
        """Why the blob is not what its name says (missing, wrong size, wrong content), or None when it is."""
        path = self.path(sha256)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while block := f.read(_COPY_BLOCK):
                    digest.update(block)
                actual = f.tell()
        except FileNotFoundError:
            return f"blob {sha256[:12]} is missing from the store ({path})"
        if actual != size:
            return f"blob {sha256[:12]} holds {actual} bytes, {size} expected ({path})"
        if digest.hexdigest() != sha256:
            return f"blob {sha256[:12]} does not match its sha256 ({path}): damaged on disk"
        return None

    def read_range(self, sha256: str, offset: int, size: int) -> bytes:
        try:
            with open(self.path(sha256), "rb") as f:
                f.seek(offset)
                return f.read(size)
        except FileNotFoundError:
            raise BlobMissing(sha256) from None

    def materialize(self, files: dict[str, str], dest: Path) -> Path:
        """Lay out blobs as a bundle directory ``dest`` ({relative path: sha256}), hard-linking where possible."""
        for rel, sha in files.items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.path(sha), target)
            except OSError:
                shutil.copyfile(self.path(sha), target)
        return dest

    def _touch(self, path: Path) -> None:
        """Stored again: a shared store's garbage collection counts its age from now."""
        if self.shared:
            with contextlib.suppress(OSError):
                os.utime(path)

    def list_blobs(self, older_than_s: float = 0.0) -> list[str]:
        cutoff = time.time() - older_than_s
        found = []
        for blob in self.blobs.glob("*/*/*"):
            try:
                if older_than_s <= 0 or blob.stat().st_mtime < cutoff:
                    found.append(blob.name)
            except FileNotFoundError:
                continue  # another replica deleted it
        return found

    def delete(self, sha256: str) -> bool:
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def clean_tmp(self) -> int:
        """Remove leftovers of interrupted writes (call at start-up, before any import runs); in a shared
        directory only those older than SHARED_GRACE_S (the others may be another replica's writes)."""
        removed = 0
        cutoff = time.time() - SHARED_GRACE_S
        for leftover in self.tmp.iterdir():
            if self.shared:
                try:
                    if leftover.stat().st_mtime >= cutoff:
                        continue
                except FileNotFoundError:
                    continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed += 1
        return removed


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a shared filesystem may otherwise show the old entry after a crash)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""The content-addressed artifact store: every file is kept once, under its sha256.

Writes are atomic (temporary file in the store, fsync, rename), so a crash
leaves either a complete blob or nothing; a blob is never half-written under
its final name. Manifests are stored as blobs too, under their artifact id.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_COPY_BLOCK = 1024 * 1024


def sha256_file(path: Path) -> str:
    """The sha256 (hex) of a file's content, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class BlobMissing(KeyError):
    """A blob the database refers to is not in the store."""


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

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
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp_name, final)
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

    def clean_tmp(self) -> int:
        """Remove leftovers of interrupted writes (call at start-up, before any import runs)."""
        removed = 0
        for leftover in self.tmp.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed += 1
        return removed

"""The database artifact store (``artifact_store = "database"``): blobs as rows every replica reaches.

A blob is one ``artifact_blob`` row (sha256, size, piece size) and its bytes in ``artifact_blob_piece`` rows of
``piece_size`` bytes each (bytea on PostgreSQL, BLOB on SQLite), keyed by (sha256, index): no single huge row,
and the importer cuts a file at the delivery's chunk size, so sending one chunk reads one row by its primary
key. Every read returns exactly the bytes stored; whether they are still the right ones is checked against the
signed manifest's chunk hash by the delivery before a chunk is sent (``ChunkSource``), and over the whole blob
by ``check``.

Writes: the file is hashed first, then its header and pieces go in one transaction that starts with
``INSERT ... ON CONFLICT DO NOTHING`` on the header. Two replicas storing the same content at once: the second
waits on the first's uncommitted key (PostgreSQL) or on the write lock (SQLite), then finds the blob there and
only refreshes ``stored_at``. A crash mid-write rolls the whole blob back: there are no temporary leftovers.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from controller.db.models import ArtifactBlob, ArtifactBlobPiece, table
from controller.db.types import utcnow
from controller.registry.store import BlobMissing

#: pieces written per statement (executemany): a few MiB in memory at a time
_BATCH = 16
#: piece size of blobs stored without a chunk size (put_file, put_bytes): the delivery's default chunk
DEFAULT_PIECE = 256 * 1024

_BLOB = table(ArtifactBlob)
_PIECE = table(ArtifactBlobPiece)
_PIECE_SQL = "SELECT data FROM artifact_blob_piece WHERE sha256 = %s AND idx = %s"


def _pieces(src: Path, piece_size: int) -> Iterator[bytes]:
    with open(src, "rb") as f:
        while block := f.read(piece_size):
            yield block


class DatabaseStore:
    kind = "database"
    shared = True

    def __init__(self, engine: Engine, piece_size: int = DEFAULT_PIECE) -> None:
        self.engine = engine
        self.piece_size = piece_size
        #: sha256 -> (size, piece size) of blobs seen: a blob's content never changes under its name
        self._headers: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._binary = engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        #: chunk reads on PostgreSQL: autocommit (no BEGIN/ROLLBACK round trips) and no ping before each use (a
        #: dead connection is retried once instead): ~3x fewer round trips per chunk than the shared engine's
        self._reads = engine
        if engine.dialect.name == "postgresql":
            self._reads = create_engine(
                engine.url, isolation_level="AUTOCOMMIT", pool_size=4, max_overflow=8, pool_recycle=3600
            )

    def where(self, sha256: str) -> str:
        return f"artifact_blob {sha256[:12]} in the database"

    # ------------------------------------------------------------ writes --

    def put_file(self, src: Path, replace: bool = False) -> tuple[str, int]:
        sha, size, _ = self._put(src, self.piece_size, None, replace)
        return sha, size

    def put_file_chunked(self, src: Path, chunk_size: int) -> tuple[str, int, list[str]]:
        return self._put(src, chunk_size, chunk_size, False)

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self._write(sha, len(data), self.piece_size, lambda n: (data[i : i + n] for i in range(0, len(data), n)), False)
        return sha

    def _put(self, src: Path, piece_size: int, chunk_size: int | None, replace: bool) -> tuple[str, int, list[str]]:
        digest = hashlib.sha256()
        chunk_hashes: list[str] = []
        size = 0
        for block in _pieces(src, chunk_size or piece_size):
            digest.update(block)
            size += len(block)
            if chunk_size is not None:
                chunk_hashes.append(hashlib.sha256(block).hexdigest())
        sha = digest.hexdigest()
        self._write(sha, size, piece_size, lambda n: _pieces(src, n), replace)
        return sha, size, chunk_hashes

    def _write(
        self, sha: str, size: int, piece_size: int, pieces: Callable[[int], Iterator[bytes]], replace: bool
    ) -> None:
        count = -(-size // piece_size)
        with self.engine.begin() as conn:
            if replace:
                old = conn.execute(select(_BLOB.c.piece_size).where(_BLOB.c.sha256 == sha)).scalar()
                piece_size = old or piece_size
                count = -(-size // piece_size)
                conn.execute(delete(_PIECE).where(_PIECE.c.sha256 == sha))
                conn.execute(delete(_BLOB).where(_BLOB.c.sha256 == sha))
            header = {"sha256": sha, "size": size, "piece_size": piece_size, "pieces": count, "stored_at": utcnow()}
            if not self._insert_header(conn, header):  # stored already (by this replica or another)
                conn.execute(update(_BLOB).where(_BLOB.c.sha256 == sha).values(stored_at=utcnow()))
                return
            batch: list[dict[str, Any]] = []
            written = 0
            for idx, block in enumerate(pieces(piece_size)):
                batch.append({"sha256": sha, "idx": idx, "data": block})
                written += len(block)
                if len(batch) >= _BATCH:
                    conn.execute(insert(_PIECE), batch)
                    batch = []
            if batch:
                conn.execute(insert(_PIECE), batch)
            if written != size:  # the file changed between hashing and storing: store nothing
                raise OSError(f"the file changed while it was stored ({written} bytes read, {size} hashed)")
        with self._lock:
            self._headers.pop(sha, None)

    @staticmethod
    def _insert_header(conn: Connection, header: dict[str, Any]) -> bool:
        """INSERT the header unless it exists; True when this transaction inserted it."""
        dialect_insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(conn.dialect.name)
        if dialect_insert is None:  # pragma: no cover - the two supported databases have ON CONFLICT
            if conn.execute(select(_BLOB.c.sha256).where(_BLOB.c.sha256 == header["sha256"])).first():
                return False
            conn.execute(insert(_BLOB), header)
            return True
        stmt = dialect_insert(_BLOB).values(header).on_conflict_do_nothing(index_elements=["sha256"])
        return conn.execute(stmt.returning(_BLOB.c.sha256)).first() is not None

    # ------------------------------------------------------------- reads --

    def _header(self, conn: Connection, sha256: str) -> tuple[int, int]:
        with self._lock:
            known = self._headers.get(sha256)
        if known is not None:
            return known
        row = conn.execute(select(_BLOB.c.size, _BLOB.c.piece_size).where(_BLOB.c.sha256 == sha256)).first()
        if row is None:
            raise BlobMissing(sha256)
        found = (int(row[0]), int(row[1]))
        with self._lock:
            self._headers[sha256] = found
        return found

    def _piece(self, conn: Connection, sha256: str, idx: int) -> bytes:
        if self._binary:  # psycopg's binary format: bytea as is, not hex text (2-3x faster for 256 KiB)
            with conn.connection.driver_connection.cursor(binary=True) as cur:  # type: ignore[union-attr]
                cur.execute(_PIECE_SQL, (sha256, idx))
                row = cur.fetchone()
        else:
            row = conn.execute(select(_PIECE.c.data).where(_PIECE.c.sha256 == sha256, _PIECE.c.idx == idx)).first()
        return bytes(row[0]) if row is not None else b""

    def has(self, sha256: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(_BLOB.c.sha256).where(_BLOB.c.sha256 == sha256)).first() is not None

    def read(self, sha256: str) -> bytes:
        with self.engine.connect() as conn:
            self._header(conn, sha256)  # BlobMissing
            rows = conn.execute(select(_PIECE.c.data).where(_PIECE.c.sha256 == sha256).order_by(_PIECE.c.idx))
            return b"".join(bytes(r[0]) for r in rows)

    def read_range(self, sha256: str, offset: int, size: int) -> bytes:
        # A connection the server closed (a restart, a proxy): the pool is renewed and the read made once more.
        lost: Any = getattr(self._reads.dialect.loaded_dbapi, "OperationalError", DBAPIError)
        for attempt in (1, 2):
            with self._reads.connect() as conn:
                try:
                    return self._range(conn, sha256, offset, size)
                except DBAPIError as exc:
                    if attempt == 2 or not exc.connection_invalidated:
                        raise
                except lost:  # from the driver's own cursor (binary reads): not wrapped, nothing invalidated yet
                    if attempt == 2:
                        raise
                    conn.invalidate()
                    self._reads.dispose()
        raise AssertionError("unreachable")  # pragma: no cover

    def _range(self, conn: Connection, sha256: str, offset: int, size: int) -> bytes:
        total, piece = self._header(conn, sha256)
        end = min(offset + size, total)
        if end <= offset:
            return b""
        first, last = offset // piece, (end - 1) // piece
        c = _PIECE.c
        if first == last:  # a chunk of the size it was stored at: one row by its primary key
            blob = self._piece(conn, sha256, first)
        else:
            rows = conn.execute(select(c.data).where(c.sha256 == sha256, c.idx >= first, c.idx <= last).order_by(c.idx))
            blob = b"".join(bytes(r[0]) for r in rows)
        start = offset - first * piece
        return blob[start : start + (end - offset)]

    def check(self, sha256: str, size: int) -> str | None:
        where = self.where(sha256)
        with self.engine.connect() as conn:
            row = conn.execute(select(_BLOB.c.size, _BLOB.c.pieces).where(_BLOB.c.sha256 == sha256)).first()
            if row is None:
                return f"blob {sha256[:12]} is missing from the store ({where})"
            digest = hashlib.sha256()
            actual = pieces = 0
            result = conn.execution_options(yield_per=_BATCH).execute(
                select(_PIECE.c.data).where(_PIECE.c.sha256 == sha256).order_by(_PIECE.c.idx)
            )
            for (data,) in result:
                digest.update(data)
                actual += len(data)
                pieces += 1
        if actual != size or pieces != row[1]:
            return f"blob {sha256[:12]} holds {actual} bytes in {pieces} pieces, {size} expected ({where})"
        if digest.hexdigest() != sha256:
            return f"blob {sha256[:12]} does not match its sha256 ({where}): damaged in the database"
        return None

    # ------------------------------------------------------------ upkeep --

    def list_blobs(self, older_than_s: float = 0.0) -> list[str]:
        stmt = select(_BLOB.c.sha256)
        if older_than_s > 0:
            stmt = stmt.where(_BLOB.c.stored_at < utcnow() - timedelta(seconds=older_than_s))
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(stmt)]

    def delete(self, sha256: str) -> bool:
        with self.engine.begin() as conn:
            conn.execute(delete(_PIECE).where(_PIECE.c.sha256 == sha256))
            gone = conn.execute(delete(_BLOB).where(_BLOB.c.sha256 == sha256)).rowcount
        with self._lock:
            self._headers.pop(sha256, None)
        return bool(gone)

    def clean_tmp(self) -> int:
        """Nothing to clean: an interrupted write is a rolled-back transaction."""
        return 0

    def close(self) -> None:
        """Close the chunk readers' connections (the shared engine is its owner's to dispose)."""
        if self._reads is not self.engine:
            self._reads.dispose()

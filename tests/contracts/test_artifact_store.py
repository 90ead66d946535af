"""The ``ArtifactStore`` protocol (controller/registry/store.py) against every backend: the local directory, a
shared directory, and the database store on SQLite and on PostgreSQL (``tests/postgres.py``: a database of its
own, skipped with the reason when no server answers). Put, has, whole and ranged reads, chunk reads, a byte
flipped in the store caught by ``check`` and by the delivery's chunk check, repair by ``replace``, concurrent
writers of the same and of different content, deletion and the shared stores' garbage-collection grace."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import Engine, text, update

from controller.db.engine import make_engine, migrate
from controller.db.models import ArtifactBlobPiece, table
from controller.delivery.transfer import ChunkSource, ChunkUnavailable
from controller.registry.dbstore import DatabaseStore
from controller.registry.store import ArtifactStore, BlobMissing, ContentStore
from tests.postgres import own_database

CHUNK = 4096


@dataclass
class Backend:
    name: str
    #: a new store object on the same storage (another replica, or this one restarted)
    open: Callable[[], ArtifactStore]
    #: flip one byte at ``offset`` of the stored blob, behind the store's back
    flip: Callable[[str, int], None]


def _flip_file(store: ContentStore) -> Callable[[str, int], None]:
    def flip(sha: str, offset: int) -> None:
        path = store.path(sha)
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))

    return flip


def _flip_row(engine: Engine) -> Callable[[str, int], None]:
    t = table(ArtifactBlobPiece)

    def flip(sha: str, offset: int) -> None:
        store = DatabaseStore(engine, CHUNK)
        with engine.connect() as conn:
            _, piece = store._header(conn, sha)
        idx, at = divmod(offset, piece)
        data = bytearray(store.read_range(sha, idx * piece, piece))
        data[at] ^= 0x01
        with engine.begin() as conn:
            conn.execute(update(t).where(t.c.sha256 == sha, t.c.idx == idx).values(data=bytes(data)))

    return flip


@pytest.fixture(
    params=[
        "local",
        "shared-directory",
        "database-sqlite",
        pytest.param("database-postgresql", marks=pytest.mark.postgres),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with contextlib.ExitStack() as stack:
        if request.param in ("local", "shared-directory"):
            shared = request.param == "shared-directory"
            root = tmp_path / "store"
            first = ContentStore(root, shared=shared)
            yield Backend(request.param, lambda: ContentStore(root, shared=shared), _flip_file(first))
            return
        if request.param == "database-sqlite":
            url = f"sqlite:///{tmp_path / 'artifacts.db'}"
        else:
            url = stack.enter_context(own_database("slmfleet_artifacts"))
        engine = make_engine(url)
        stack.callback(engine.dispose)
        migrate(engine)
        yield Backend(request.param, lambda: DatabaseStore(engine, CHUNK), _flip_row(engine))


def _file(tmp_path: Path, name: str, size: int, seed: int = 0) -> Path:
    path = tmp_path / name
    path.write_bytes(bytes((i * 31 + seed * 7 + i // 251) % 256 for i in range(size)))
    return path


def test_a_file_is_stored_once_under_its_sha256_and_reads_back_whole(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    src = _file(tmp_path, "model.onnx", 3 * CHUNK + 100)
    data = src.read_bytes()
    sha, size = store.put_file(src)
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert store.has(sha) and store.read(sha) == data
    assert store.put_file(src) == (sha, size), "identical content: same name, stored once"
    assert store.list_blobs() == [sha]
    assert store.check(sha, size) is None
    other = backend.open()  # another replica (or this one after a restart) sees it
    assert other.has(sha) and other.read(sha) == data
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    e_sha, e_size = store.put_file(empty)
    assert e_size == 0 and store.read(e_sha) == b"" and store.check(e_sha, 0) is None
    assert store.put_bytes(b"manifest") == hashlib.sha256(b"manifest").hexdigest()
    assert store.read(hashlib.sha256(b"manifest").hexdigest()) == b"manifest"


def test_chunk_reads_return_exactly_the_manifest_pieces(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    src = _file(tmp_path, "weights.bin", 5 * CHUNK + 17, seed=1)
    data = src.read_bytes()
    sha, size, hashes = store.put_file_chunked(src, CHUNK)
    pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    assert hashes == [hashlib.sha256(p).hexdigest() for p in pieces]
    for i, piece in enumerate(pieces):
        assert store.read_range(sha, i * CHUNK, CHUNK) == piece, f"chunk {i}"
    # ranges across the pieces the store cut the blob into, and past its end
    assert store.read_range(sha, CHUNK - 10, 2 * CHUNK + 20) == data[CHUNK - 10 : 3 * CHUNK + 10]
    assert store.read_range(sha, size - 5, 100) == data[-5:]
    assert store.read_range(sha, size, 10) == b""


def test_a_missing_blob_is_reported_missing(backend: Backend) -> None:
    store = backend.open()
    sha = hashlib.sha256(b"never stored").hexdigest()
    assert not store.has(sha)
    with pytest.raises(BlobMissing):
        store.read(sha)
    with pytest.raises(BlobMissing):
        store.read_range(sha, 0, 10)
    assert "missing" in (store.check(sha, 10) or "")


def test_a_flipped_byte_fails_the_check_and_the_chunk_is_never_sent(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    src = _file(tmp_path, "model.onnx", 3 * CHUNK, seed=2)
    data = src.read_bytes()
    sha, size, hashes = store.put_file_chunked(src, CHUNK)
    manifest = SimpleNamespace(
        artifact_id="a" * 64,
        files=[SimpleNamespace(path="model.onnx", sha256=sha, size=size)],
        chunks=[SimpleNamespace(file=0, offset=i * CHUNK, size=CHUNK, sha256=h) for i, h in enumerate(hashes)],
    )
    source = ChunkSource(manifest, store)  # type: ignore[arg-type]
    assert source.frame(1).endswith(data[CHUNK : 2 * CHUNK])
    backend.flip(sha, CHUNK + 5)
    fresh = backend.open()  # what another replica, which never sent it, reads
    assert "does not match its sha256" in (fresh.check(sha, size) or "")
    with pytest.raises(ChunkUnavailable, match="does not match its sha256"):
        ChunkSource(manifest, fresh).frame(1)  # type: ignore[arg-type]
    with pytest.raises(ChunkUnavailable):
        source.frame(1, recheck=True)
    assert ChunkSource(manifest, fresh).frame(0).endswith(data[:CHUNK]), "the other chunks are intact"
    # a good copy put over the damaged one repairs it
    assert fresh.put_file(src, replace=True) == (sha, size)
    assert fresh.check(sha, size) is None
    assert ChunkSource(manifest, backend.open()).frame(1).endswith(data[CHUNK : 2 * CHUNK])  # type: ignore[arg-type]


def test_concurrent_writers_of_the_same_and_other_content_leave_every_blob_whole(
    backend: Backend, tmp_path: Path
) -> None:
    files = [_file(tmp_path, f"f{i}", 8 * CHUNK + i % 3, seed=i % 3) for i in range(6)]  # 3 contents, each twice
    expected = {hashlib.sha256(f.read_bytes()).hexdigest(): f.stat().st_size for f in files}
    assert len(expected) == 3
    start = threading.Barrier(len(files))
    results: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def write(src: Path) -> None:
        store = backend.open()  # its own store object (own connections): as separate replicas are
        try:
            start.wait(10)
            results.append(store.put_file_chunked(src, CHUNK)[:2])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(results) == sorted((hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_size) for f in files)
    store = backend.open()
    assert sorted(store.list_blobs()) == sorted(expected)
    for sha, size in expected.items():
        assert store.check(sha, size) is None
    if isinstance(store, ContentStore):
        assert list(store.tmp.iterdir()) == [], "no temporary file left behind"


def test_deleted_blobs_are_gone_and_shared_stores_spare_young_ones(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    a = store.put_file(_file(tmp_path, "a", 100, seed=1))[0]
    b = store.put_file(_file(tmp_path, "b", 100, seed=2))[0]
    assert sorted(store.list_blobs()) == sorted([a, b])
    assert store.list_blobs(older_than_s=3600) == [], "both were stored just now"
    assert store.delete(a) and not store.delete(a)
    assert not store.has(a) and store.list_blobs() == [b]
    if isinstance(store, ContentStore):
        leftover = store.tmp / "blob-interrupted"
        leftover.write_bytes(b"half")
        removed = store.clean_tmp()
        assert leftover.exists() == store.shared, "a shared directory's fresh temporary file may be another replica's"
        old = store.tmp / "blob-old"
        old.write_bytes(b"old")
        os.utime(old, (1, 1))
        assert store.clean_tmp() >= 1 and not old.exists()
        assert removed == (0 if store.shared else 1)
    else:
        assert store.clean_tmp() == 0


def test_chunk_reads_survive_the_server_closing_every_connection(backend: Backend, tmp_path: Path) -> None:
    """A PostgreSQL restart (or a proxy) closes pooled connections: the next chunk read gets a new one."""
    if backend.name != "database-postgresql":
        pytest.skip("PostgreSQL only: a server that closes its clients' connections")
    store = backend.open()
    assert isinstance(store, DatabaseStore)
    src = _file(tmp_path, "model.onnx", 2 * CHUNK, seed=3)
    sha, _, _ = store.put_file_chunked(src, CHUNK)
    assert store.read_range(sha, 0, CHUNK) == src.read_bytes()[:CHUNK]  # a pooled reader connection now
    with store.engine.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar()
    assert killed and killed >= 1
    assert store.read_range(sha, CHUNK, CHUNK) == src.read_bytes()[CHUNK:]
    store.close()

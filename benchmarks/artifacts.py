"""Artifact store backends: storing a model file and reading it back chunk by chunk, as a broadcast does.

``python -m benchmarks artifacts [--quick]``. One file of random bytes (64 MiB; 8 MiB quick) cut in 256 KiB
chunks goes into each backend: the local directory, the database store on SQLite, and on PostgreSQL
(``$SLMFLEET_BENCH_POSTGRES``, default the local server as user postgres, in a throwaway database; left out
with the reason when none answers). Then every chunk is read in a shuffled order, as ``ChunkSource`` reads
them (``read_range`` of one chunk, then its sha256 against the manifest's), for at most a few passes and
seconds. Figures: MiB/s stored, chunks/s and MiB/s read, and the database backends' ratio to the local one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from controller.db.engine import make_engine, migrate
from controller.registry.dbstore import DatabaseStore
from controller.registry.store import ArtifactStore, ContentStore

CHUNK = 256 * 1024
POSTGRES = os.environ.get("SLMFLEET_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    name = f"slmfleet_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def measure(store: ArtifactStore, src: Path, max_passes: int, max_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    sha, size, hashes = store.put_file_chunked(src, CHUNK)
    put_s = time.perf_counter() - started
    order = list(range(len(hashes)))
    rng = random.Random(1)
    chunks = passes = 0
    read_bytes = 0
    started = time.perf_counter()
    deadline = started + max_s
    while passes < max_passes and time.perf_counter() < deadline:
        rng.shuffle(order)
        for i in order:
            data = store.read_range(sha, i * CHUNK, CHUNK)
            if hashlib.sha256(data).hexdigest() != hashes[i]:
                raise AssertionError(f"chunk {i} read back wrong from {store.kind}")
            chunks += 1
            read_bytes += len(data)
        passes += 1
    read_s = time.perf_counter() - started
    mib = 1024 * 1024
    return {
        "stored_mib_per_s": round(size / mib / put_s, 1),
        "chunks_read": chunks,
        "passes": passes,
        "chunks_per_s": round(chunks / read_s),
        "read_mib_per_s": round(read_bytes / mib / read_s, 1),
        "us_per_chunk": round(read_s / chunks * 1e6),
    }


def run(quick: bool = False) -> dict[str, Any]:
    size = (8 if quick else 64) * 1024 * 1024
    max_passes, max_s = (2, 3.0) if quick else (3, 15.0)
    results: dict[str, Any] = {"file_mib": size // (1024 * 1024), "chunk_kib": CHUNK // 1024}
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-artifacts-") as tmp:
        root = Path(tmp)
        src = root / "model.bin"
        src.write_bytes(os.urandom(size))
        results["local"] = measure(ContentStore(root / "store"), src, max_passes, max_s)
        sqlite = make_engine(f"sqlite:///{root / 'bench.db'}")
        migrate(sqlite)
        results["database_sqlite"] = measure(DatabaseStore(sqlite, CHUNK), src, max_passes, max_s)
        sqlite.dispose()
        try:
            with _postgres() as url:
                engine = make_engine(url)
                migrate(engine)
                results["database_postgresql"] = measure(DatabaseStore(engine, CHUNK), src, max_passes, max_s)
                engine.dispose()
        except Exception as exc:  # no server: say so instead of a figure
            results["database_postgresql"] = {"skipped": f"{type(exc).__name__}: {str(exc)[:200]}"}
    local = results["local"]["chunks_per_s"]
    for name in ("database_sqlite", "database_postgresql"):
        if "chunks_per_s" in results[name]:
            results[name]["read_ratio_to_local"] = round(results[name]["chunks_per_s"] / local, 3)
    return results

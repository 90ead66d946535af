"""The artifact store benchmark: every backend stores the file and reads every chunk back verified."""

from __future__ import annotations

from pathlib import Path

from benchmarks.artifacts import CHUNK, measure
from controller.db.engine import make_engine, migrate
from controller.registry.dbstore import DatabaseStore
from controller.registry.store import ContentStore


def test_each_backend_reads_every_chunk_back_as_stored(tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(bytes(range(256)) * (3 * CHUNK // 256) + b"tail")  # 3 full chunks and a short one
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    migrate(engine)
    try:
        for store in (ContentStore(tmp_path / "store"), DatabaseStore(engine, CHUNK)):
            figures = measure(store, src, max_passes=2, max_s=30.0)
            assert figures["chunks_read"] == 8 and figures["passes"] == 2, figures  # sha256-checked in measure
            assert figures["chunks_per_s"] > 0 and figures["stored_mib_per_s"] > 0
    finally:
        engine.dispose()

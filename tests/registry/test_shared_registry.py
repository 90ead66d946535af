"""A replica starting on a shared artifact store leaves other replicas' work alone: an import job that made
progress recently stays running, and a blob stored recently that no artifact lists yet (an import not committed)
is not collected; what is old and unreferenced goes, as on a single controller. Marks of corrupt artifacts, and
their repairs, reach every replica."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import Session

from controller.db.engine import make_engine, migrate
from controller.db.models import Artifact, ArtifactBlob, ImportJob, Model, ModelVersion, table
from controller.db.types import utcnow
from controller.errors import SettingsError
from controller.metrics import Metrics
from controller.registry.dbstore import DatabaseStore
from controller.registry.integrity import ArtifactIntegrity
from controller.registry.service import RegistryService
from controller.settings import load_settings


@pytest.mark.parametrize("store", ["local", "database"])
def test_start_up_spares_what_another_replica_may_be_doing(tmp_path: Path, store: str) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    migrate(engine)
    service = RegistryService(
        engine, tmp_path / "data", chunk_size=4096, validity_days=1, max_unpacked_bytes=1 << 20, artifact_store=store
    )
    with Session(engine) as s:
        s.add(ImportJob(id="recent", model_name="m", status="running", updated_at=utcnow()))
        s.add(ImportJob(id="silent", model_name="m", status="running", updated_at=utcnow() - timedelta(hours=2)))
        s.commit()
    fresh = service.store.put_bytes(b"an import in progress on another replica")
    old = service.store.put_bytes(b"left by an import that died two days ago")
    if store == "database":
        blobs = table(ArtifactBlob)
        with engine.begin() as conn:
            conn.execute(update(blobs).where(blobs.c.sha256 == old).values(stored_at=utcnow() - timedelta(days=2)))
    service.start()
    try:
        with Session(engine) as s:
            status = {j: s.get(ImportJob, j).status for j in ("recent", "silent")}  # type: ignore[union-attr]
        shared = store != "local"
        assert status == {"recent": "running" if shared else "failed", "silent": "failed"}
        assert service.store.has(fresh) == shared, "a young unreferenced blob is spared only in a shared store"
        assert not service.store.has(old)
    finally:
        service.stop()
        engine.dispose()


def test_a_corrupt_mark_and_its_repair_reach_the_other_replicas(tmp_path: Path) -> None:
    """Replica A finds an artifact damaged and marks it; B, sharing the store, stops using it; A's repair clears
    the mark and B uses it again, checking its chunks anew (``on_repaired``)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    migrate(engine)
    store = DatabaseStore(engine, 4096)
    sha = store.put_bytes(b"weights" * 1000)
    with Session(engine) as s:
        model = Model(name="pump", task="anomaly")
        s.add(model)
        s.flush()
        version = ModelVersion(model_id=model.id or 0, number=1, source="upload")
        s.add(version)
        s.flush()
        files = [{"path": "model.onnx", "sha256": sha, "size": 7000}]
        s.add(
            Artifact(
                id="a" * 64, version_id=version.id or 0, variant="fp32", signed_manifest={"manifest": {"files": files}}
            )
        )
        s.commit()
    a = ArtifactIntegrity(engine, store, Metrics(), refresh_s=0.0)
    b = ArtifactIntegrity(engine, store, Metrics(), refresh_s=0.0)
    single = ArtifactIntegrity(engine, store, Metrics())  # a single controller's: never re-reads
    for integrity in (a, b, single):
        integrity.load()
    rechecked: list[str] = []
    b.on_repaired.append(rechecked.append)
    a.mark_corrupt("a" * 64, "chunk 3 does not match its sha256")
    assert b.corrupt_reason("a" * 64) == "chunk 3 does not match its sha256"
    assert single.corrupt_reason("a" * 64) is None
    assert a.verify("a" * 64).ok  # the store's copy is intact: the mark goes
    assert b.corrupt_reason("a" * 64) is None and rechecked == ["a" * 64]
    engine.dispose()


def test_the_artifact_store_setting(tmp_path: Path) -> None:
    assert not load_settings(data_dir=tmp_path).shared_artifacts, "local stays the default"
    assert load_settings(data_dir=tmp_path, artifact_store="database").shared_artifacts
    shared = load_settings(data_dir=tmp_path, artifact_store=str(tmp_path / "mnt"))
    assert shared.shared_artifacts and shared.artifact_store == str(tmp_path / "mnt")
    with pytest.raises(SettingsError, match="artifact_store is local, database or the absolute path"):
        load_settings(data_dir=tmp_path, artifact_store="relative/dir")

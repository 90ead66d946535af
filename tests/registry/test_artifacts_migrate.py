"""``slmfleet artifacts migrate --to database|DIR``: an existing single controller's files and signing key move to
the database store (or a shared directory) a replica then serves them from; running it again copies nothing more."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from controller.cli import app
from controller.db.engine import make_engine, migrate
from controller.db.models import Artifact, Model, ModelVersion
from controller.db.secrets import SharedSecrets
from controller.registry import keys
from controller.registry.service import open_store
from controller.registry.store import ContentStore


@pytest.mark.parametrize("to", ["database", "shared-directory"])
def test_migrate_copies_every_artifact_file_and_the_signing_key(tmp_path: Path, to: str) -> None:
    target = "database" if to == "database" else str(tmp_path / "mnt" / "artifacts")
    data = tmp_path / "ctl"
    engine = make_engine(f"sqlite:///{data / 'controller.db'}")
    migrate(engine)
    local = ContentStore(data / "registry" / "store")
    src = tmp_path / "model.onnx"
    src.write_bytes(bytes(range(256)) * 100)
    sha, size = local.put_file(src)
    key = keys.load_or_create(data / "keys")
    with Session(engine) as s:
        model = Model(name="pump", task="anomaly")
        s.add(model)
        s.flush()
        version = ModelVersion(model_id=model.id or 0, number=1, source="upload")
        s.add(version)
        s.flush()
        files = [{"path": "model.onnx", "sha256": sha, "size": size}]
        manifest = {"model": "pump", "version": 1, "variant": "fp32", "chunk_size": 4096, "files": files}
        s.add(Artifact(id="a" * 64, version_id=version.id or 0, variant="fp32", signed_manifest={"manifest": manifest}))
        s.commit()

    runner = CliRunner()
    first = runner.invoke(app, ["artifacts", "migrate", "--to", target, "--data-dir", str(data)])
    assert first.exit_code == 0, first.output
    store = open_store(target, engine, tmp_path / "unused", 4096)
    assert f"1 files copied to the {store.kind} store" in first.output
    assert store.read(sha) == src.read_bytes() and store.check(sha, size) is None
    assert store.read_range(sha, 4096, 4096) == src.read_bytes()[4096:8192]
    assert keys.load_shared(SharedSecrets(engine), tmp_path / "replica-b" / "keys").key_id == key.key_id
    again = runner.invoke(app, ["artifacts", "migrate", "--to", target, "--data-dir", str(data)])
    assert again.exit_code == 0 and "0 files copied" in again.output and "1 already there" in again.output
    engine.dispose()

"""A byte flipped in the controller's own store: the delivery stops at once with the reason, the artifact is
marked corrupt and announced, and a repair from a good copy makes it deployable again. Devices that keep
getting an intact chunk damaged are given up with the reason instead of looping until their timeout."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from controller.db.models import AuditEntry
from tests.delivery import test_delivery as base
from tests.delivery.test_delivery import CHUNK, deploy, deployment, register_anomaly
from tests.helpers import metric_value, wait_until

# the same controller (chunks of CHUNK bytes, a real broker) as the delivery tests; peers come from conftest.py
ctl = base.ctl


def blob_path(controller: Any, sha256: str) -> Path:
    return Path(controller.runtime.models.store.path(sha256))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_byte_flipped_in_the_store_fails_the_deployment_marks_and_is_repaired(  # type: ignore[no-untyped-def]
    ctl, peers, tmp_path: Path
) -> None:
    version = register_anomaly(ctl, tmp_path)
    fp32 = next(v for v in version["variants"] if v["variant"] == "fp32")
    artifact_id = fp32["artifact_id"]
    manifest = ctl.client.get(f"/api/v1/artifacts/{artifact_id}/manifest").json()["manifest"]
    model_file = next(f for f in manifest["files"] if f["path"] == "model.onnx")
    assert model_file["size"] > 3 * CHUNK
    blob = blob_path(ctl, model_file["sha256"])
    backup = tmp_path / "backup" / "model.onnx"
    backup.parent.mkdir()
    shutil.copyfile(blob, backup)
    flip_byte(blob, 2 * CHUNK + 17)  # in the third chunk of the model file

    devices = [peers("d0"), peers("d1")]
    dep = deploy(ctl, model="pump", version=1, variant="fp32", target={"devices": ["d0", "d1"]})
    done = wait_until(lambda: (d := deployment(ctl, dep["id"]))["status"] == "failed" and d, 30, what="failed")
    for target in done["targets"]:
        assert target["state"] == "failed"
        assert "corrupt in the controller's store" in target["reason"] and "model.onnx" in target["reason"]
        assert f"slmfleet model repair {artifact_id}" in target["reason"]
    assert all(d.bad_frames == 0 for d in devices), "a damaged chunk went out"
    assert all(not d.complete() for d in devices)
    wait_until(lambda: all(any(type(c).__name__ == "Cancel" for c in d.commands) for d in devices), 10)
    metrics = ctl.client.get("/metrics").text
    assert metric_value(metrics, "slmfleet_artifact_corruptions_total") == 1
    assert metric_value(metrics, "slmfleet_chunks_published_total", {"kind": "repair"}) == 0

    # marked, announced (audit entry by the controller), not deployable
    variants = ctl.client.get("/api/v1/models/pump/versions/1").json()["variants"]
    summary = next(v for v in variants if v["variant"] == "fp32")
    assert summary["corrupt_at"] is not None and "does not match its sha256" in summary["corrupt_reason"]
    with Session(ctl.runtime.engine) as session:
        entries = session.exec(select(AuditEntry).where(AuditEntry.action == "artifact.corrupt")).all()
    assert [(e.actor, e.target) for e in entries] == [("controller", artifact_id)]
    assert entries[0].detail["chunk"] == 2 and entries[0].detail["file"] == "model.onnx"
    again = ctl.client.post(
        "/api/v1/deployments",
        json={"model": "pump", "version": 1, "variant": "fp32", "target": {"devices": ["d0"]}},
        headers=ctl.auth,
    )
    assert again.status_code == 409 and "corrupt" in again.json()["detail"], again.text

    # a check alone finds it still damaged; an unrelated file is ignored; the good copy repairs it
    r = ctl.client.post(f"/api/v1/artifacts/{artifact_id}/repair", headers=ctl.auth)
    assert r.status_code == 200 and not r.json()["ok"], r.text
    (tmp_path / "backup" / "notes.txt").write_text("not part of the artifact")
    files = [("file", ("model.onnx", backup.read_bytes())), ("file", ("notes.txt", b"not part of the artifact"))]
    r = ctl.client.post(f"/api/v1/artifacts/{artifact_id}/repair", files=files, headers=ctl.auth)
    report = r.json()
    assert r.status_code == 200 and report["ok"], r.text
    assert report["ignored"] == ["notes.txt"]
    assert [f["path"] for f in report["files"] if f["replaced"]] == ["model.onnx"]
    assert blob.read_bytes() == backup.read_bytes()
    with Session(ctl.runtime.engine) as session:
        actions = [e.action for e in session.exec(select(AuditEntry).where(AuditEntry.target == artifact_id)).all()]
    assert actions == ["artifact.corrupt", "artifact.check", "artifact.repair", "artifact.check"]

    dep2 = deploy(ctl, model="pump", version=1, variant="fp32", target={"devices": ["d0", "d1"]})
    wait_until(lambda: all(d.deployment_id == dep2["id"] and d.complete() for d in devices), 30, what="delivered")
    for d in devices:
        assert d.bad_frames == 0
        d.finish()
    wait_until(lambda: deployment(ctl, dep2["id"])["status"] == "completed", 15)


def test_a_chunk_a_device_keeps_getting_damaged_ends_its_deployment_with_the_reason(  # type: ignore[no-untyped-def]
    ctl, peers, tmp_path: Path
) -> None:
    register_anomaly(ctl, tmp_path)
    device = peers("d0", ignore_broadcast=True)
    dep = deploy(ctl, model="pump", version=1, variant="fp32", target={"devices": ["d0"]})
    wait_until(lambda: device.manifest is not None and device.state.value == "downloading", 10)
    for _ in range(9):  # the chunk arrives damaged again and again; the store's copy is fine
        device.chunks.pop(1, None)
        device.request_missing(bad=[1])
    wait_until(lambda: metric_value(ctl.client.get("/metrics").text, "slmfleet_chunk_bad_reports_total") == 9, 10)
    assert deployment(ctl, dep["id"])["targets"][0]["state"] == "downloading"
    device.chunks.pop(1, None)
    device.request_missing(bad=[1])
    done = wait_until(lambda: (d := deployment(ctl, dep["id"]))["status"] == "failed" and d, 10)
    reason = done["targets"][0]["reason"]
    assert "chunk 1 of model.onnx arrived damaged 10 times" in reason and "intact" in reason, reason
    assert metric_value(ctl.client.get("/metrics").text, "slmfleet_artifact_corruptions_total") == 0

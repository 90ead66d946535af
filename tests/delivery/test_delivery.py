"""Controller-side delivery against protocol peers on a real broker: broadcast once, repair, variants,
timeouts, cancel, restart."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from controller.delivery import service as delivery_service
from controller.delivery.variants import choose_variant
from tests.delivery.peer import PeerDevice
from tests.helpers import metric_value, wait_until
from tests.registry.tiny_models import anomaly_model, text_classifier
from wire.messages import InstalledModel

CHUNK = 4096


@pytest.fixture
def ctl(private_broker, make_controller):  # type: ignore[no-untyped-def]
    return make_controller(private_broker, chunk_size=CHUNK)


def register_anomaly(ctl, tmp_path: Path, name: str = "pump") -> dict:  # type: ignore[no-untyped-def]
    path, threshold = anomaly_model(tmp_path / "m.onnx")
    options = {"task": "anomaly", "anomaly": {"threshold": threshold, "higher_is_anomalous": False, "output": "scores"}}
    r = ctl.client.post(
        f"/api/v1/models/{name}/versions",
        files=[("file", ("m.onnx", path.read_bytes()))],
        data={"options": json.dumps(options)},
        headers=ctl.auth,
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def deploy(ctl, **body: Any) -> dict:  # type: ignore[no-untyped-def]
    r = ctl.client.post("/api/v1/deployments", json=body, headers=ctl.auth)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def deployment(ctl, dep_id: str) -> dict:  # type: ignore[no-untyped-def]
    return ctl.client.get(f"/api/v1/deployments/{dep_id}").json()  # type: ignore[no-any-return]


def test_each_chunk_is_broadcast_once_to_all_devices(ctl, peers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    version = register_anomaly(ctl, tmp_path)
    devices = [peers(f"d{i}") for i in range(4)]
    dep = deploy(ctl, model="pump", version=1, variant="fp32", target={"devices": [d.device_id for d in devices]})
    assert dep["status"] == "running" and {t["state"] for t in dep["targets"]} <= {"pending", "downloading"}
    wait_until(lambda: all(d.complete() for d in devices), 30, what="all chunks at every device")
    for d in devices:
        assert d.bad_frames == 0 and d.from_repair == 0
        d.finish()
    done = wait_until(lambda: (x := deployment(ctl, dep["id"]))["status"] == "completed" and x, 15)
    assert done["counts"] == {"active": 4} and all(t["percent"] == 100 for t in done["targets"])
    fp32 = next(v for v in version["variants"] if v["variant"] == "fp32")
    n_chunks = -(-fp32["size_bytes"] // CHUNK)
    metrics = ctl.client.get("/metrics").text
    assert metric_value(metrics, "slmfleet_chunks_published_total", {"kind": "broadcast"}) == n_chunks
    sent = metric_value(metrics, "slmfleet_chunk_bytes_published_total", {"kind": "broadcast"})
    assert fp32["size_bytes"] <= sent <= fp32["size_bytes"] + 48 * n_chunks  # ~1x the artifact, not 4x
    assert metric_value(metrics, "slmfleet_deployment_targets", {"state": "active"}) == 4


def test_a_later_deployment_of_the_same_artifact_is_broadcast_again(ctl, peers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Waves of a rollout are deployments of one artifact, one after another: each wave gets a broadcast
    (one stream through the broker), not a repair stream per device."""
    version = register_anomaly(ctl, tmp_path)
    fp32 = next(v for v in version["variants"] if v["variant"] == "fp32")
    n_chunks = -(-fp32["size_bytes"] // CHUNK)
    waves = [[peers(f"w1-{i}") for i in range(2)], [peers(f"w2-{i}") for i in range(3)]]
    for number, wave in enumerate(waves, 1):
        dep = deploy(ctl, model="pump", version=1, variant="fp32", devices=[d.device_id for d in wave])
        wait_until(lambda w=wave: all(d.complete() for d in w), 30, what=f"wave {number} has every chunk")  # type: ignore[misc]
        for d in wave:
            d.finish()
        wait_until(lambda d=dep: deployment(ctl, d["id"])["status"] == "completed", 15)  # type: ignore[misc]
        metrics = ctl.client.get("/metrics").text
        assert metric_value(metrics, "slmfleet_chunks_published_total", {"kind": "broadcast"}) == number * n_chunks
    got = {d.device_id: (d.from_broadcast, d.from_repair) for wave in waves for d in wave}
    assert got == {d.device_id: (n_chunks, 0) for wave in waves for d in wave}, got
    assert metric_value(metrics, "slmfleet_chunks_published_total", {"kind": "repair"}) == 0


def test_missing_chunks_are_repaired_to_the_device_alone(ctl, peers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    register_anomaly(ctl, tmp_path)
    lossy = peers("lossy", drop={0, 3, 7, 20})
    late = peers("late", ignore_broadcast=True)
    fine = peers("fine")
    dep = deploy(ctl, model="pump", version=1, variant="fp32", devices=["lossy", "late", "fine"])
    wait_until(lambda: fine.complete(), 30)
    wait_until(lambda: lossy.manifest is not None and len(lossy.chunks) == len(lossy.manifest.chunks) - 4, 30)
    assert late.chunks == {}
    assert lossy.request_missing() == [(0, 1), (3, 4), (7, 8), (20, 21)]
    late.request_missing()
    wait_until(lambda: lossy.complete() and late.complete(), 30, what="repairs delivered")
    assert lossy.from_repair == 4 and fine.from_repair == 0
    assert late.from_repair == len(late.chunks) and late.from_broadcast == 0
    for p in (lossy, late, fine):
        p.finish()
    wait_until(lambda: deployment(ctl, dep["id"])["status"] == "completed", 15)


def test_auto_variant_follows_the_device_and_a_device_nothing_fits_fails_clearly(ctl, peers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle = text_classifier(tmp_path / "clf")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(bundle, arcname="b")
    r = ctl.client.post(
        "/api/v1/models/clf/versions",
        files=[("file", ("b.tar", buf.getvalue()))],
        data={"options": json.dumps({"task": "text-classification"})},
        headers=ctl.auth,
    )
    assert r.status_code == 201, r.text
    big, tiny = peers("big"), peers("tiny", ram_bytes=16 * 2**20)
    dep = deploy(ctl, model="clf", version=1, devices=["big", "tiny"])
    by_device = {t["device_id"]: t for t in dep["targets"]}
    assert by_device["big"]["variant"] == "int8"
    assert by_device["tiny"]["state"] == "failed" and "no variant fits" in by_device["tiny"]["reason"]
    assert "MiB RAM, the device has 16 MiB" in by_device["tiny"]["reason"]
    wait_until(lambda: big.deploys, 10)
    assert big.manifest is not None and big.manifest.variant == "int8"
    assert tiny.deploys == []


def test_variant_choice_prefers_int8_and_falls_back_by_ram() -> None:
    arts = {
        "fp32": {"artifact_id": "a" * 64, "min_ram_bytes": 400 << 20},
        "int8": {"artifact_id": "b" * 64, "min_ram_bytes": 150 << 20},
        "int4": {"artifact_id": "c" * 64, "min_ram_bytes": 90 << 20},
    }
    assert choose_variant({"ram_bytes": 4 << 30}, arts).variant == "int8"
    assert choose_variant({"ram_bytes": 128 << 20}, arts).variant == "int4"
    assert choose_variant({"ram_bytes": 64 << 20}, arts).variant is None
    assert choose_variant({"ram_bytes": 4 << 30}, {"fp32": arts["fp32"]}).variant == "fp32"
    forced = choose_variant({"ram_bytes": 128 << 20}, arts, "fp32")
    assert forced.variant == "fp32" and "needs 400 MiB" in forced.reason
    assert choose_variant({"ram_bytes": 1 << 30}, arts, "fp16").variant is None


def test_a_device_that_stays_silent_times_out(ctl, peers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    register_anomaly(ctl, tmp_path)
    peers("mute", ignore_broadcast=True)
    dep = deploy(ctl, model="pump", version=1, devices=["mute"], timeout_s=1.5)
    done = wait_until(lambda: (x := deployment(ctl, dep["id"]))["status"] == "failed" and x, 15)
    target = done["targets"][0]
    assert target["state"] == "failed" and "timed out after 2s in state downloading" in target["reason"]


def test_cancel_stops_devices_that_have_not_switched(ctl, peers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    register_anomaly(ctl, tmp_path)
    slow = peers("slow", ignore_broadcast=True)
    dep = deploy(ctl, model="pump", version=1, devices=["slow"])
    wait_until(lambda: slow.deploys, 10)
    r = ctl.client.post(f"/api/v1/deployments/{dep['id']}/cancel", headers=ctl.auth)
    assert r.status_code == 200 and r.json()["devices"] == 1
    wait_until(lambda: any(c.type == "cancel" for c in slow.commands), 10)
    assert deployment(ctl, dep["id"])["status"] == "cancelled"
    assert ctl.client.post(f"/api/v1/deployments/{dep['id']}/cancel").status_code == 401


def test_deployments_are_validated(ctl, peers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    register_anomaly(ctl, tmp_path)
    peers("v1")
    cases = [
        ({"model": "nope", "version": 1, "devices": ["v1"]}, 404, "not found"),
        ({"model": "pump", "version": 9, "devices": ["v1"]}, 404, "no version 9"),
        ({"model": "pump", "version": 1, "devices": ["ghost"]}, 404, "unknown devices: ghost"),
        ({"model": "pump", "version": 1}, 422, "exactly one target"),
        ({"model": "pump", "version": 1, "devices": ["v1"], "selector": "a=b"}, 422, "exactly one target"),
        # valid requests the fleet's state refuses: not 422 (that means the request breaks the schema)
        ({"model": "pump", "version": 1, "selector": "site=nowhere"}, 409, "no device matches"),
        ({"model": "pump", "version": 1, "devices": ["v1"], "variant": "int3"}, 404, "no int3 variant"),
        ({"model": "pump", "version": 0, "devices": ["v1"]}, 422, "version"),
    ]
    for body, status, needle in cases:
        r = ctl.client.post("/api/v1/deployments", json=body, headers=ctl.auth)
        assert r.status_code == status, (body, r.text)
        assert needle in r.text, (body, r.text)


def test_a_deployed_version_cannot_be_deleted(ctl, peers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    register_anomaly(ctl, tmp_path)
    register_anomaly(ctl, tmp_path)
    peers("keep")
    deploy(ctl, model="pump", version=1, devices=["keep"])
    r = ctl.client.delete("/api/v1/models/pump/versions/1", headers=ctl.auth)
    assert r.status_code == 409 and "cannot be deleted" in r.json()["detail"]
    assert ctl.client.delete("/api/v1/models/pump/versions/2", headers=ctl.auth).status_code == 204
    assert ctl.client.get("/api/v1/models/pump/versions/2").status_code == 404


def test_commands_are_sent_again_after_a_controller_restart(private_broker, make_controller, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = make_controller(private_broker, chunk_size=CHUNK)
    register_anomaly(first, tmp_path)
    key = first.client.get("/api/v1/signing-key").json()["public_key_pem"]
    peer = PeerDevice(private_broker.port, "r1", key, ignore_broadcast=True)
    try:
        wait_until(lambda: first.client.get("/api/v1/devices/r1").status_code == 200, 10)
        dep = deploy(first, model="pump", version=1, devices=["r1"])
        wait_until(lambda: len(peer.deploys) == 1, 10)
        first.client.__exit__(None, None, None)  # controller stops
        data_dir = first.runtime.settings.data_dir
        second = make_controller(private_broker, chunk_size=CHUNK, data_dir=data_dir)
        wait_until(lambda: len(peer.deploys) >= 2, 15, what="Deploy re-sent after the restart")
        assert peer.deploys[-1].deployment_id == dep["id"]
        peer.request_missing()
        wait_until(peer.complete, 30, what="repairs from the restarted controller")
        peer.finish()
        wait_until(lambda: deployment(second, dep["id"])["status"] == "completed", 15)
    finally:
        peer.close()


def test_a_device_that_switches_after_its_timeout_is_believed_or_sent_back(ctl, peers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The controller gave up on a device (timeout) but it switched after all: a running deployment
    counts it active; a deployment rolled back meanwhile sends it back like the others."""
    v1 = register_anomaly(ctl, tmp_path)["variants"][0]
    register_anomaly(ctl, tmp_path)
    had = [InstalledModel(model="pump", version=1, variant="fp32", artifact=v1["artifact_id"])]
    believed, rolled = (
        peers("believed", installed=had),
        peers("rolled", installed=had),
    )
    for peer in (believed, rolled):
        dep = deploy(ctl, model="pump", version=2, variant="fp32", devices=[peer.device_id], timeout_s=3)
        wait_until(lambda p=peer: p.manifest is not None and p.manifest.model == "pump" and p.deploys, 10)  # type: ignore[misc]
        wait_until(peer.complete, 15, what="every chunk (the device then stays silent)")
        wait_until(lambda d=dep: deployment(ctl, d["id"])["status"] == "failed", 15)  # type: ignore[misc]
        if peer is rolled:
            assert ctl.client.post(f"/api/v1/deployments/{dep['id']}/rollback", headers=ctl.auth).status_code == 200
        peer.finish()
        if peer is believed:
            done = wait_until(lambda d=dep: (x := deployment(ctl, d["id"]))["status"] == "completed" and x, 15)  # type: ignore[misc]
            assert done["targets"][0]["state"] == "active"
        else:
            wait_until(lambda: any(c.type == "rollback" for c in rolled.commands), 15, what="a rollback command")
            assert deployment(ctl, dep["id"])["targets"][0]["state"] == "rolling_back"


def test_a_deploy_command_the_device_never_acknowledged_is_sent_again(ctl, peers, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Issue 16: a Deploy lost on its way (with a broker node that died under load) is never acknowledged; the
    device stays online (it moved to another node without missing a keepalive) and nothing else re-sends it. The
    controller, replica or not, sends the command again to a device silent NUDGE_S mid-deployment."""
    monkeypatch.setattr(delivery_service, "NUDGE_S", 1.0)
    register_anomaly(ctl, tmp_path)
    peer = peers("lost-cmd", lose_first_deploy=True)
    dep = deploy(ctl, model="pump", version=1, devices=["lost-cmd"])
    wait_until(lambda: peer.lost, 10, what="the first Deploy (lost)")
    assert not ctl.runtime.settings.replica
    wait_until(lambda: peer.deploys, 15, what="the Deploy sent again to the silent device")
    assert peer.deploys[0].deployment_id == dep["id"]
    wait_until(peer.complete, 30, what="every chunk at the device")
    peer.finish()
    done = wait_until(lambda: (x := deployment(ctl, dep["id"]))["status"] == "completed" and x, 15)
    assert done["targets"][0]["state"] == "active"

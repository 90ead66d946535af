"""One byte flipped in a chunk the controller stores (issue 20): with ``slmfleet up``, a real agent and a real
mosquitto, the deployment fails at once with the reason instead of looping on repairs for an hour, the agent
keeps serving its model, and ``slmfleet model repair`` with a good copy makes the version deployable again."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from controller.broker.embedded import free_port
from tests.e2e.fleet import Fleet, served_version
from tests.e2e.test_deploy_real_agents import deploy, deployment, pin_key, register
from tests.helpers import REPO, metric_value, slmfleet_cmd, wait_until

pytestmark = pytest.mark.slow


def test_a_flipped_byte_in_the_store_fails_fast_and_is_repaired(fleet: Fleet, tmp_path: Path) -> None:
    ctl = fleet.start_controller(env={"SLMFLEET_CHUNK_SIZE": "4096"})
    register(ctl, tmp_path, 1)
    v2 = register(ctl, tmp_path, 2)
    http_port = free_port()
    fleet.start_agent(
        "edge-1", "--signing-key-file", str(pin_key(ctl, tmp_path / "ctl.pem")), "--http-port", str(http_port)
    )
    fleet.wait_online(["edge-1"], 60)
    first = deploy(ctl, 1, ["edge-1"])
    wait_until(lambda: deployment(ctl, first)["status"] == "completed", 90, what="v1 deployed")
    assert served_version(http_port) == 1

    # flip one byte of v2's model file in the controller's content store (a good copy is kept aside)
    fp32 = next(v for v in v2["variants"] if v["variant"] == "fp32")
    manifest = ctl.get(f"/api/v1/artifacts/{fp32['artifact_id']}/manifest").json()["manifest"]
    model = next(f for f in manifest["files"] if f["path"] == "model.onnx")
    blob = ctl.data_dir / "registry" / "store" / "blobs" / model["sha256"][:2] / model["sha256"][2:4] / model["sha256"]
    good = tmp_path / "good-copy"
    good.mkdir()
    shutil.copyfile(blob, good / "model.onnx")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x10
    blob.write_bytes(bytes(data))

    second = deploy(ctl, 2, ["edge-1"])
    done = wait_until(lambda: (d := deployment(ctl, second))["status"] != "running" and d, 30, what="v2 ends")
    (target,) = done["targets"]
    assert done["status"] == "failed" and target["state"] == "failed", done
    assert "corrupt in the controller's store" in target["reason"] and "model.onnx" in target["reason"], target
    assert served_version(http_port) == 1, "the device keeps serving its model"
    metrics = ctl.get("/metrics").text
    assert metric_value(metrics, "slmfleet_artifact_corruptions_total") == 1
    assert metric_value(metrics, "slmfleet_chunk_requests_total") < 20, "no loop of repair requests"
    assert metric_value(metrics, "slmfleet_chunks_published_total", {"kind": "repair"}) == 0

    # the operator repairs it from the good copy with the CLI, and deploys again
    check = subprocess.run(
        slmfleet_cmd("model", "repair", "pump@2/fp32", "--data-dir", str(ctl.data_dir)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 1 and "still damaged" in check.stderr, check.stderr
    repaired = subprocess.run(
        slmfleet_cmd("model", "repair", "pump@2/fp32", str(good), "--data-dir", str(ctl.data_dir)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "intact" in repaired.stdout and "replaced" in repaired.stdout
    third = deploy(ctl, 2, ["edge-1"])
    wait_until(lambda: deployment(ctl, third)["status"] == "completed", 90, what="v2 deployed after the repair")
    assert served_version(http_port) == 2

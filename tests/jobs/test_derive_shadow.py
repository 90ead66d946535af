"""A derived version's rollout gated on agreement with its parent in shadow, on real processes.

A tiny teacher (``tiny@1``) is distilled into a student that keeps its hidden size (``tiny@2`` or ``@3``,
lineage parent ``tiny@1``); a real agent serves the teacher and answers live requests; a rollout of the
student with a shadow step ``against: parent`` runs the student beside the teacher on the agent, whose
agreement (cosine of the embeddings) reaches the ``shadow_agreement`` gate, which decides. Refused at creation
(422, why and what to do) instead of a shadow that never gets a sample: a version whose embeddings are narrower
than the served model's; ``against: parent`` for a version without a parent, or while the device does not
serve the parent.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.broker.embedded import EmbeddedBroker, free_port
from tests.e2e.fleet import ControllerProc, Fleet
from tests.e2e.test_deploy_real_agents import Traffic
from tests.helpers import slmfleet_cmd, wait_until
from tests.jobs.support import STUDENT, checkpoint_tar, import_options, teacher_checkpoint, texts_file
from tests.registry.shrink_models import tiny_bert

pytestmark = pytest.mark.slow
pytest.importorskip("torch")

DEVICE = "edge-shadow"
#: only the shadow gate: the test is about it (the other gates have their own tests)
GATES = {
    "error_rate_max": None,
    "p95_latency_ratio_max": None,
    "rss_ratio_max": None,
    "shadow_agreement_min": 0.5,
    "min_samples": 10,
    "warmup_s": 0,
    "deadline_s": 120,
}


@pytest.fixture
def fleet(tmp_path: Path, private_broker: EmbeddedBroker) -> Iterator[Fleet]:
    f = Fleet(tmp_path, private_broker.url)
    yield f
    f.stop()


def call(ctl: ControllerProc, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, ctl.api + path, headers=ctl.auth, timeout=kw.pop("timeout", 30), **kw)


def ok(r: httpx.Response, code: int = 200) -> Any:
    assert r.status_code == code, r.text
    return r.json()


def import_checkpoint(ctl: ControllerProc, root: Path) -> int:
    r = call(
        ctl,
        "POST",
        "/api/v1/models/tiny/versions",
        files=[("file", ("ckpt.tar", checkpoint_tar(root)))],
        data={"options": import_options(variants=["fp32"])},
        params={"wait": 300},
        timeout=330,
    )
    return int(ok(r, 201)["number"])


def rollout(ctl: ControllerProc, version: int, shadow: dict[str, Any]) -> httpx.Response:
    body = {
        "model": "tiny",
        "version": version,
        "variant": "fp32",
        "selector": "role=shadow",
        "waves": [{"until": "100%", "bake_s": 0}],
        "gates": GATES,
        "shadow": {"sample_rate": 1.0, "min_samples": 20, "max_duration_s": 120, **shadow},
    }
    return call(ctl, "POST", "/api/v1/rollouts", json=body)


def test_a_distilled_version_is_gated_on_agreement_with_its_parent(fleet: Fleet, tmp_path: Path) -> None:
    ctl = fleet.start_controller()
    assert import_checkpoint(ctl, teacher_checkpoint(tmp_path)) == 1
    data = texts_file(tmp_path / "texts.jsonl")
    params = {"student": STUDENT, "epochs": 3}
    queued = call(
        ctl,
        "POST",
        "/api/v1/models/tiny/versions/1/distill",
        data={"params": json.dumps(params)},
        files={"data": ("texts.jsonl", data.read_bytes())},
    )
    job_id = ok(queued, 202)["id"]
    narrow = import_checkpoint(ctl, tiny_bert(tmp_path / "narrow", layers=2, hidden=32, heads=4, ffn=64))
    done = wait_until(
        lambda: (
            (j := ok(call(ctl, "GET", f"/api/v1/derive-jobs/{job_id}")))["status"] not in ("queued", "running") and j
        ),
        240,
        0.3,
        what="the distillation ends",
    )
    assert done["status"] == "succeeded" and len(done["produced"]) == 1, done
    derived = int(done["produced"][0].removeprefix("tiny@"))  # 2 or 3: the narrow import runs meanwhile
    assert {derived, narrow} == {2, 3}
    assert ok(call(ctl, "GET", f"/api/v1/models/tiny/versions/{derived}"))["lineage"]["parent"] == "tiny@1"

    key = tmp_path / "controller.pem"
    key.write_text(ok(call(ctl, "GET", "/api/v1/signing-key"))["public_key_pem"])
    port = free_port()
    fleet.start_agent(DEVICE, "--signing-key-file", str(key), "--http-port", str(port), "--label=role=shadow")
    fleet.wait_online([DEVICE], 60)
    # against the parent while the device serves nothing yet: refused, saying who serves what
    early = rollout(ctl, derived, {"against": "parent"})
    assert early.status_code == 422 and "1 of the 1 targeted devices do not serve it" in early.text, early.text
    dep = ok(
        call(
            ctl,
            "POST",
            "/api/v1/deployments",
            json={"model": "tiny", "version": 1, "variant": "fp32", "target": {"devices": [DEVICE]}},
        ),
        201,
    )["id"]
    state = wait_until(
        lambda: (d := ok(call(ctl, "GET", f"/api/v1/deployments/{dep}")))["status"] in ("completed", "failed") and d,
        120,
        what="the teacher deployed",
    )
    assert state["status"] == "completed", state
    wait_until(  # what the controller knows the device serves (its next birth message), which the checks read
        lambda: any(
            m["active"] and (m["model"], m["version"]) == ("tiny", 1)
            for m in ok(call(ctl, "GET", f"/api/v1/devices/{DEVICE}"))["installed"]
        ),
        30,
        what="the device reported serving tiny@1",
    )

    # narrower embeddings than the teacher the device serves: refused at creation, with the reason and the way out
    refused = rollout(ctl, narrow, {})
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert "32 wide" in detail and "64 wide" in detail and "tiny@1" in detail and "undefined" in detail, detail
    assert "hidden size" in detail, detail
    # against the parent, for a version without one: refused too
    orphan = rollout(ctl, narrow, {"against": "parent"})
    assert orphan.status_code == 422 and "not a derived version" in orphan.json()["detail"], orphan.text
    # the CLI's --shadow-parent asks for the same, and shows the same refusal
    cli = subprocess.run(
        slmfleet_cmd(
            "rollout",
            "create",
            f"tiny@{narrow}",
            "--selector",
            "role=shadow",
            "--shadow-parent",
            "--api",
            ctl.api,
            "--data-dir",
            str(ctl.data_dir),
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode != 0 and "not a derived version" in cli.stdout + cli.stderr, cli
    assert ok(call(ctl, "GET", "/api/v1/rollouts")) == []

    texts = Traffic(port, 5000, {"text": "the pump ran warm at dawn"})
    try:
        created = ok(rollout(ctl, derived, {"against": "parent"}), 201)
        assert created["shadow"]["against"] == "parent"
        assert "shadow compares with the lineage parent tiny@1" in created["transitions"][0]["reason"], created
        ended = wait_until(
            lambda: (
                (r := ok(call(ctl, "GET", f"/api/v1/rollouts/{created['id']}")))["state"] in ("completed", "aborted")
                and r
            ),
            180,
            0.3,
            what="the rollout ends",
        )
    finally:
        texts.stop()
    assert texts.versions[1] > 0 and not texts.failures, texts.failures[:3]
    judged = [t for t in ended["transitions"] if t["from_state"] == "shadow_gating"]
    assert len(judged) == 1 and judged[0]["reason"].startswith("shadow agreement "), ended["transitions"]
    agreement = float(judged[0]["reason"].split()[2])
    # what the agent measured: the student beside the teacher on live inputs, every sample scored (same width)
    dep_view = ok(call(ctl, "GET", f"/api/v1/deployments/{ended['waves'][0]['deployment_id']}"))
    measured = dep_view["targets"][0]["metrics"]
    assert measured["shadow_samples"] >= GATES["min_samples"] and measured["shadow_errors"] == 0, measured
    assert measured["shadow_agreement"] == pytest.approx(agreement, abs=1e-3), measured
    # distilled from the teacher it is compared with: close to it, so the gate passes and the rollout completes
    assert ended["state"] == "completed" and agreement >= GATES["shadow_agreement_min"], ended

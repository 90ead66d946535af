"""Derive jobs on an in-process controller: a distillation through REST makes a version with its lineage and a
report; a version imported as ONNX is refused with the reason; a cancel stops the worker and makes no version;
a worker killed mid-step is started again and resumes; a controller stopped mid-job resumes it when it starts
again (one version per step); a worker cannot reach the network."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from controller.db.models import ModelVersion
from tests.helpers import wait_until
from tests.jobs.support import STUDENT, checkpoint_tar, import_options, labeled_file, teacher_checkpoint, texts_file
from tests.registry.tiny_models import text_classifier

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return teacher_checkpoint(tmp_path_factory.mktemp("derive"))


def import_teacher(ctl: Any, teacher: Path, name: str = "tiny") -> dict[str, Any]:
    r = ctl.client.post(
        f"/api/v1/models/{name}/versions",
        files=[("file", ("teacher.tar", checkpoint_tar(teacher)))],
        data={"options": import_options()},
        headers=ctl.auth,
        params={"wait": 300},
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def job(ctl: Any, job_id: str) -> dict[str, Any]:
    r = ctl.client.get(f"/api/v1/derive-jobs/{job_id}", headers=ctl.auth)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def wait_job(ctl: Any, job_id: str, timeout: float = 180) -> dict[str, Any]:
    return wait_until(  # type: ignore[no-any-return]
        lambda: (j := job(ctl, job_id))["status"] not in ("queued", "running") and j, timeout, 0.3, what="job ends"
    )


def distill(ctl: Any, data: Path, **params: Any) -> dict[str, Any]:
    r = ctl.client.post(
        "/api/v1/models/tiny/versions/1/distill",
        data={"params": json.dumps({"student": STUDENT, **params})},
        files={"data": ("texts.jsonl", data.read_bytes())},
        headers=ctl.auth,
    )
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def versions(ctl: Any, name: str = "tiny") -> list[dict[str, Any]]:
    return ctl.client.get(f"/api/v1/models/{name}", headers=ctl.auth).json()["version_list"]  # type: ignore[no-any-return]


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def training(ctl: Any, job_id: str, past: int = 0, not_pid: int | None = None) -> dict[str, Any]:
    """The job once its current worker reports training beyond optimizer step ``past``."""

    def beyond() -> dict[str, Any] | None:
        j = job(ctl, job_id)
        m = re.search(r"epoch \d+/\d+, step (\d+)/", j["message"])
        fresh = j["worker_pid"] and j["worker_pid"] != not_pid
        return j if fresh and m and int(m.group(1)) > past else None

    return wait_until(beyond, 120, 0.1, what=f"training beyond step {past}")  # type: ignore[return-value]


def test_distill_makes_a_version_with_its_lineage_and_report(make_controller, teacher: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ctl = make_controller(None)
    v1 = import_teacher(ctl, teacher)
    assert v1["has_checkpoint"] and v1["lineage"] is None
    data = texts_file(tmp_path / "texts.jsonl")
    queued = distill(ctl, data, epochs=2)
    assert queued["status"] in ("queued", "running") and queued["steps"][0]["params"]["student"] == STUDENT
    done = wait_job(ctl, queued["id"][:8])  # any unique prefix of the id is accepted
    assert done["status"] == "succeeded", done
    assert done["produced"] == ["tiny@2"] and done["worker_pid"] is None
    report = done["report"][0]
    assert report["version"] == "tiny@2" and report["params_after"] < report["params_before"]
    assert "cosine_mean" in report["quality"] and report["variants"]["int8"]["size_bytes"] > 0
    assert report["variants"]["fp32"]["latency_ms_p50"] is not None
    v2 = ctl.client.get("/api/v1/models/tiny/versions/2", headers=ctl.auth).json()
    lineage = v2["lineage"]
    assert lineage["parent"] == "tiny@1" and lineage["teacher"] == "tiny@1" and lineage["step"] == "distill"
    assert lineage["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest() == done["data_sha256"]
    assert lineage["job"] == done["id"] and lineage["settings"]["shape"]["layers"] == 2
    assert v2["has_checkpoint"], "a derived version keeps its checkpoint: the next job starts from it"
    assert {v["variant"] for v in v2["variants"]} == {"fp32", "int8"}
    # the job's data is dropped from the store once the job ended; the checkpoints are kept
    assert ctl.runtime.models.collect_garbage() >= 1
    assert not ctl.runtime.models.store.has(done["data_sha256"])
    listed = ctl.client.get("/api/v1/derive-jobs", params={"model": "tiny"}, headers=ctl.auth).json()
    assert [j["id"] for j in listed] == [done["id"]]
    page = ctl.client.get("/api/v1/models/tiny", headers=ctl.auth)
    assert page.status_code == 200

    # refusals: no data for a distillation, bad parameters, an unknown version, a version imported as ONNX
    r = ctl.client.post(
        "/api/v1/models/tiny/versions/1/distill", data={"params": '{"student": "bert-mini"}'}, headers=ctl.auth
    )
    assert r.status_code == 422 and "needs a data file" in r.json()["detail"]
    r = ctl.client.post("/api/v1/models/tiny/versions/1/prune", data={"params": '{"heads": 2}'}, headers=ctl.auth)
    assert r.status_code == 422 and "heads" in r.json()["detail"]
    r = ctl.client.post(
        "/api/v1/models/tiny/versions/9/prune", data={"params": '{"heads": 0.5, "ffn": 0.5}'}, headers=ctl.auth
    )
    assert r.status_code == 404 and "no version 9" in r.json()["detail"]
    r = ctl.client.post(
        "/api/v1/models/onnx-only/versions",
        files=[("file", ("bundle.tar", checkpoint_tar(text_classifier(tmp_path / "clf"))))],
        data={"options": json.dumps({"task": "text-classification", "variants": ["fp32"]})},
        headers=ctl.auth,
        params={"wait": 300},
    )
    assert r.status_code == 201 and not r.json()["has_checkpoint"], r.text
    r = ctl.client.post(
        "/api/v1/models/onnx-only/versions/1/finetune",
        files={"data": ("labeled.jsonl", labeled_file(tmp_path / "labeled.jsonl").read_bytes())},
        headers=ctl.auth,
    )
    assert r.status_code == 409, r.text
    assert "imported as ONNX" in r.json()["detail"] and "Hugging Face checkpoint" in r.json()["detail"]


def test_cancel_stops_the_worker_and_makes_no_version(make_controller, teacher: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ctl = make_controller(None)
    import_teacher(ctl, teacher)
    queued = distill(ctl, texts_file(tmp_path / "texts.jsonl"), epochs=200)
    pid = training(ctl, queued["id"])["worker_pid"]
    r = ctl.client.post(f"/api/v1/derive-jobs/{queued['id'][:10]}/cancel", headers=ctl.auth)
    assert r.status_code == 200 and r.json()["cancel_requested"], r.text
    done = wait_job(ctl, queued["id"], 60)
    assert done["status"] == "cancelled" and "made no version" in done["message"], done
    assert [v["number"] for v in versions(ctl)] == [1]
    assert not alive(pid)
    assert not (ctl.runtime.settings.data_dir / "jobs" / queued["id"]).exists()
    r = ctl.client.post(f"/api/v1/derive-jobs/{queued['id']}/cancel", headers=ctl.auth)
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]


def test_a_killed_worker_and_a_stopped_controller_resume_the_job(
    make_controller, teacher: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    data_dir = tmp_path / "ctl"
    ctl = make_controller(None, data_dir=data_dir)
    import_teacher(ctl, teacher)
    queued = distill(ctl, texts_file(tmp_path / "texts.jsonl"), epochs=35)
    first = training(ctl, queued["id"], 30)["worker_pid"]  # past a save of its state (every 25 steps)
    os.kill(first, signal.SIGKILL)  # the OOM killer, say: the worker is started again, from its saved state
    second = training(ctl, queued["id"], 60, not_pid=first)
    assert second["worker_pid"] != first and second["attempts"] == 2, second
    # the controller stops (its workers are told to save and stop); the job stays running
    ctl.client.__exit__(None, None, None)
    assert not alive(second["worker_pid"])
    stopped = ctl.client.app.state.runtime  # type: ignore[attr-defined]
    with Session(stopped.engine) as session:
        assert not session.exec(select(ModelVersion).where(ModelVersion.derive_job_id == queued["id"])).all()
    again = make_controller(None, data_dir=data_dir)
    done = wait_job(again, queued["id"])
    assert done["status"] == "succeeded" and done["produced"] == ["tiny@2"], done
    assert [v["number"] for v in versions(again)] == [1, 2]
    notes = done["report"][0].get("notes", [])
    assert any("resum" in n for n in notes), notes


def test_a_worker_cannot_reach_the_network(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "controller.jobs.worker", "--check-network", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        assert result["connect"].startswith("refused") and "never reach the network" in result["connect"]
        assert result["getaddrinfo"].startswith("refused")
        with pytest.raises(TimeoutError):
            listener.accept()


def test_step_arguments_of_the_cli_parse_and_are_checked() -> None:
    from controller.jobs.steps import StepsError, check_steps, parse_step_arg

    distill_ = parse_step_arg("distill:student=layers=3,hidden=256,heads=4,epochs=2")
    assert distill_.kind == "distill" and distill_.params == {"student": "layers=3,hidden=256,heads=4", "epochs": 2}
    quantize = parse_step_arg("quantize:variants=int8+int4")
    assert quantize.params == {"variants": ["int8", "int4"]}
    checked = check_steps([distill_, parse_step_arg("prune:heads=0.5,ffn=0.25"), quantize], has_data=True)
    assert checked[1]["params"]["recover"] is True and checked[0]["params"]["batch_size"] == 32
    for bad, message in (
        ("shrink:x=1", "must be one of"),
        ("prune:heads", "not name=value"),
    ):
        with pytest.raises(StepsError, match=message):
            parse_step_arg(bad)
    with pytest.raises(StepsError, match=r"step 1 \(finetune\) needs a data file"):
        check_steps([parse_step_arg("finetune:epochs=1")], has_data=False)
    with pytest.raises(StepsError, match=r"step 1 \(quantize\): variants"):
        check_steps([parse_step_arg("quantize:variants=int2")], has_data=False)

"""A derive job as an operator runs it, on real processes: ``slmfleet up``, the CLI, a real agent.

The teacher is imported from its checkpoint with the CLI; ``slmfleet model distill`` queues a job; the
controller is SIGKILLed mid-training (its worker dies with it); the controller started again resumes the job
from the worker's saved state; ``slmfleet job wait`` follows it to the end; the derived version has its lineage
(``slmfleet model show``), deploys to a real agent and serves embeddings of the student's width.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.broker.embedded import EmbeddedBroker, free_port
from tests.e2e.fleet import ControllerProc, Fleet
from tests.helpers import slmfleet_cmd, wait_until
from tests.jobs.support import STUDENT, teacher_checkpoint, texts_file

pytestmark = pytest.mark.slow
pytest.importorskip("torch")

DEVICE = "edge-derived"


@pytest.fixture
def fleet(tmp_path: Path, private_broker: EmbeddedBroker) -> Iterator[Fleet]:
    f = Fleet(tmp_path, private_broker.url)
    yield f
    f.stop()


def cli(ctl: ControllerProc, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        slmfleet_cmd(*args, "--api", ctl.api, "--data-dir", str(ctl.data_dir)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def get(ctl: ControllerProc, path: str) -> Any:
    r = httpx.get(ctl.api + path, headers={"Authorization": f"Bearer {ctl.token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text().lower()


def test_distill_from_the_cli_survives_a_controller_crash_and_serves_on_an_agent(fleet: Fleet, tmp_path: Path) -> None:
    ctl = fleet.start_controller()
    teacher = teacher_checkpoint(tmp_path)
    added = cli(
        ctl, "model", "import-hf", str(teacher), "--task", "embeddings", "--name", "tiny", "--variants", "fp32,int8"
    )
    assert added.returncode == 0, added.stderr
    data = texts_file(tmp_path / "texts.jsonl")
    queued = cli(
        ctl, "model", "distill", "tiny@1", "--student", STUDENT, "--data", str(data), "--epochs", "28", "--json"
    )
    assert queued.returncode == 0, queued.stderr
    job_id = json.loads(queued.stdout)["id"]

    def training_past(n: int) -> dict[str, Any] | None:
        j = get(ctl, f"/api/v1/derive-jobs/{job_id}")
        m = re.search(r"epoch \d+/\d+, step (\d+)/", j["message"])
        return j if j["worker_pid"] and m and int(m.group(1)) > n else None

    worker = wait_until(lambda: training_past(30), 180, 0.1, what="training past its first save")["worker_pid"]
    ctl.proc.kill()  # SIGKILL: the worker is told (PR_SET_PDEATHSIG) and stops, saving its state
    wait_until(lambda: not alive(worker), 30, what="the worker died with its controller")

    ctl = fleet.start_controller()
    followed = cli(ctl, "job", "wait", job_id[:8])  # the printed prefix is accepted
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert "succeeded" in followed.stdout and "tiny@2" in followed.stdout
    done = get(ctl, f"/api/v1/derive-jobs/{job_id}")
    assert done["produced"] == ["tiny@2"] and done["worker_pid"] != worker
    assert any("resumed at optimizer step" in n for n in done["report"][0]["notes"]), done["report"]
    assert [v["number"] for v in get(ctl, "/api/v1/models/tiny")["version_list"]] == [1, 2]
    shown = cli(ctl, "model", "show", "tiny@2")
    assert shown.returncode == 0 and "lineage: distill of tiny@1" in shown.stderr + shown.stdout, shown
    listed = cli(ctl, "job", "list")
    assert job_id[:12] in listed.stdout and "succeeded" in listed.stdout

    key = tmp_path / "controller.pem"
    key.write_text(get(ctl, "/api/v1/signing-key")["public_key_pem"])
    port = free_port()
    fleet.start_agent(DEVICE, "--signing-key-file", str(key), "--http-port", str(port))
    fleet.wait_online([DEVICE], 60)
    body = {"model": "tiny", "version": 2, "variant": "int8", "target": {"devices": [DEVICE]}}
    r = httpx.post(ctl.api + "/api/v1/deployments", json=body, headers={"Authorization": f"Bearer {ctl.token}"})
    assert r.status_code == 201, r.text
    dep = r.json()["id"]
    state = wait_until(
        lambda: (d := get(ctl, f"/api/v1/deployments/{dep}"))["status"] in ("completed", "failed") and d,
        120,
        what="the derived version deployed",
    )
    assert state["status"] == "completed", state
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/infer", json={"text": "the pump was quite cold"}, timeout=60)
    assert answer.status_code == 200, answer.text
    served = answer.json()
    assert served["model"]["model"] == "tiny" and served["model"]["version"] == 2
    assert len(served["result"]["embedding"]) == 64

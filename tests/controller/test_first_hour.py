"""What a first-time user meets (issue 13): the API index and offline docs, ids by prefix, a missing
quantization dependency, "online since" per connection, the CLI's file errors, the simulator report's
numbering and values, and the example models that ship in examples/."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlmodel import Session, select

from controller.db.models import Device, ImportJob, ModelVersion
from controller.telemetry.ingest import LastSeen, Offline
from simulations.report import render_html
from slmfleet.cli import main
from tests.controller import devices_util as du
from tests.helpers import REPO, RawMqtt, wait_until
from wire import codec, topics
from wire.messages import DeviceOnline, InstalledModel

EXAMPLES = REPO / "examples"


@pytest.fixture
def ctl(make_controller):  # type: ignore[no-untyped-def]
    return make_controller(None)


def test_api_v1_is_an_index_whose_links_answer(ctl) -> None:  # type: ignore[no-untyped-def]
    index = ctl.client.get("/api/v1")
    assert index.status_code == 200
    body = index.json()
    assert body["api"] == "v1" and body["version"] and body["docs"] == "/docs"
    assert {"devices", "models", "deployments", "rollouts", "health"} <= set(body["resources"])
    for name, link in body["resources"].items():
        r = ctl.client.get(link["href"], headers=ctl.auth)
        assert r.status_code == 200, (name, link, r.status_code, r.text[:200])


def test_docs_load_swagger_ui_from_the_controller_not_a_cdn(ctl) -> None:  # type: ignore[no-untyped-def]
    page = ctl.client.get("/docs")
    assert page.status_code == 200
    sources = [s for s in page.text.split('"') if s.endswith((".js", ".css", ".png"))]
    assert sources and all(s.startswith("/") for s in sources), sources  # same origin only
    for source in sources:
        asset = ctl.client.get(source)
        assert asset.status_code == 200 and len(asset.content) > 500, source
    assert "SwaggerUIBundle" in ctl.client.get("/docs-assets/swagger-ui-bundle.js").text
    assert ctl.client.get("/redoc").status_code == 404  # ReDoc would need a CDN: not offered


def test_an_id_works_by_any_unique_prefix_and_an_ambiguous_one_lists_the_candidates(ctl) -> None:  # type: ignore[no-untyped-def]
    with Session(ctl.runtime.engine) as s:
        for job_id in ("abc123" + "0" * 26, "abd456" + "0" * 26, "ab_x" + "0" * 28):
            s.add(ImportJob(id=job_id, model_name="m", status="failed"))
        s.commit()
    assert ctl.client.get("/api/v1/imports/abc1").json()["id"] == "abc123" + "0" * 26
    assert ctl.client.get("/api/v1/imports/" + "abd456" + "0" * 26).status_code == 200
    ambiguous = ctl.client.get("/api/v1/imports/ab")
    assert ambiguous.status_code == 409
    assert "abc123" in ambiguous.json()["detail"] and "abd456" in ambiguous.json()["detail"]
    assert ctl.client.get("/api/v1/imports/abz").status_code == 404
    # LIKE wildcards are literal characters here, not patterns matching every id
    assert ctl.client.get("/api/v1/imports/a_c").status_code == 404
    assert ctl.client.get("/api/v1/imports/ab_").json()["id"].startswith("ab_x")
    assert ctl.client.get("/api/v1/rollouts/ab").status_code == 404
    assert ctl.client.get("/api/v1/deployments/ab").status_code == 404


def test_a_variant_the_controller_cannot_build_for_a_missing_package_fails_the_import(
    ctl, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Not a success with fewer variants: the install is broken, and the answer says what to install."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ModuleNotFoundError, as without the package
    options = json.loads((EXAMPLES / "pump" / "options.json").read_text()) | {"task": "anomaly"}
    r = ctl.client.post(
        "/api/v1/models/pump/versions",
        files=[("file", ("pump-v1.onnx", (EXAMPLES / "pump" / "pump-v1.onnx").read_bytes()))],
        data={"options": json.dumps(options)},
        headers=ctl.auth,
    )
    assert r.status_code == 422, r.text
    assert "int8" in r.json()["detail"] and "'onnx'" in r.json()["detail"] and "pip install" in r.json()["detail"]
    with Session(ctl.runtime.engine) as s:
        assert s.exec(select(ModelVersion)).first() is None


def _birth(device_id: str, connection: str, version: int) -> tuple[str, bytes]:
    msg = DeviceOnline(
        ts=time.time(),
        agent_version="0.1.0",
        hardware=du.HW,
        installed=[InstalledModel(model="pump", version=version, variant="int8")],
        keepalive_s=30,
        telemetry_interval_s=10,
        connection=connection,
    )
    return topics.state(device_id), codec.encode(msg)


def test_online_since_is_the_connections_not_the_last_births(controller) -> None:  # type: ignore[no-untyped-def]
    raw = RawMqtt(controller.broker.port, "raw-online-since")
    try:

        def device() -> dict[str, Any]:
            controller.flush()
            return dict(controller.client.get("/api/v1/devices/dev-c").json())

        raw.publish(*_birth("dev-c", "conn-1", 1), retain=True)
        first = wait_until(lambda: (d := device()).get("installed") and d, 10, what="dev-c online")
        time.sleep(0.05)  # the clock must move on for a reset to be visible
        raw.publish(*_birth("dev-c", "conn-1", 2), retain=True)  # a model switch: same connection
        switched = wait_until(lambda: (d := device())["installed"][0]["version"] == 2 and d, 10)
        assert switched["status_changed_at"] == first["status_changed_at"]
        raw.publish(*_birth("dev-c", "conn-2", 2), retain=True)  # a reconnection
        wait_until(lambda: device()["status_changed_at"] != first["status_changed_at"], 10, what="reset")
    finally:
        raw.close()


def test_a_status_change_and_last_seen_in_one_batch_are_written(controller) -> None:  # type: ignore[no-untyped-def]
    """An empty executemany failed the whole batch (and with it other devices' data) three times over."""
    with Session(controller.runtime.engine) as s:
        s.add(Device(id="dev-d", status="online"))
        s.commit()
    now = time.time()
    controller.runtime.writer._write([Offline("dev-d", "shutdown", now), LastSeen({"dev-d": now})])
    with Session(controller.runtime.engine) as s:
        assert s.exec(select(Device).where(Device.id == "dev-d")).one().status == "offline"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        ('{"waves": [', "invalid JSON at line 1 column 12"),
        ("[1, 2]", "the file holds a list; it must be a JSON object"),
        ('{"waves": [{"until": "ten"}]}', "waves.0.until: String should match pattern"),
        ('{"waves": [{"bake": 3}]}', "waves.0.bake: unknown field; allowed: name, until,"),
        ('{"late_devices": "later"}', "late_devices: Input should be 'current', 'next' or 'none'"),
    ],
)
def test_a_bad_plan_file_is_one_line_with_the_field_and_what_is_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, expected: str
) -> None:
    plan = tmp_path / "plan.json"
    if content is not None:
        plan.write_text(content)
    api = ["--api", "http://127.0.0.1:9", "--data-dir", str(tmp_path)]  # nothing listens: nothing may be sent
    code = main(["rollout", "create", "m@1", "--selector", "a=b", "--plan", str(plan), *api])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"error: plan {plan}: ") and expected in err, err


def test_the_cli_says_where_it_looked_for_the_controller(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "controller.json").write_text(json.dumps({"api": "http://127.0.0.1:9"}))
    assert main(["devices", "list", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"(from {tmp_path.resolve() / 'controller.json'})" in err and "--api URL" in err, err


def test_the_simulator_report_counts_waves_from_1_and_shows_values_not_reprs() -> None:
    report = {
        "scenario": {"name": "s", "description": "d", "devices": 20, "profiles": [], "faults": [], "rollout": {}},
        "ok": True,
        "rollout": {
            "state": "completed",
            "wave_index": 1,
            "waves": [{"name": None, "devices": 1}, {"name": "rest", "devices": 19}],
            "transitions": [{"at": None, "from_state": "pending", "to_state": "deploying", "wave": 0, "reason": "r"}],
        },
        "timeline": [
            {
                "t": 0.0,
                "at": 100.0,
                "states": {"active": 20},
                "waves": [{"active": 1}, {"active": 19}],
                "download": [None, None],
                "mb_in": 0.0,
                "gates": [],
            },
        ],
        "assertions": [{"ok": True, "name": "chunks", "expected": {"broadcast": 25, "repair": 0}, "actual": [1.36]}],
        "resources": {"controller_cpu_s": [1.3599999999999999], "frames": {"broadcast": 25, "repair": 0}},
    }
    html = render_html(report)
    assert "Wave 1: wave 1 (1 devices)" in html and "Wave 2: rest (19 devices)" in html
    assert "Wave 0" not in html and "completed (wave 2)" in html
    assert "broadcast 25, repair 0" in html and "1.36" in html
    assert "{'broadcast'" not in html and "1.3599999999999999" not in html and "[1.36]" not in html
    downloads = html.split("<h2>Download progress</h2>")[1].split("<h2>")[0]
    assert "no data" not in downloads.split("bytes received")[0] and "finished between two samples" in downloads


def test_the_examples_are_what_their_script_makes_and_import_as_documented(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(EXAMPLES / "make_examples.py"), str(tmp_path)], check=True, cwd=tmp_path)
    import onnxruntime as ort

    windows = [json.loads(line)["values"] for line in (EXAMPLES / "pump" / "windows.jsonl").read_text().splitlines()]
    x = np.asarray(windows, dtype=np.float32)
    threshold = json.loads((EXAMPLES / "pump" / "options.json").read_text())["anomaly"]["threshold"]
    for name in ("pump-v1.onnx", "pump-v2.onnx"):
        shipped = ort.InferenceSession(str(EXAMPLES / "pump" / name)).run(None, {"values": x})[0]
        made = ort.InferenceSession(str(tmp_path / "pump" / name)).run(None, {"values": x})[0]
        np.testing.assert_allclose(shipped, made, rtol=1e-5)
        assert (shipped > threshold).sum() == 3  # the three anomalous sample windows, and only they
    assert json.loads((tmp_path / "pump" / "options.json").read_text()) == json.loads(
        (EXAMPLES / "pump" / "options.json").read_text()
    )
    for rel in ("sentiment/tokenizer.json", "sentiment/config.json", "first-rollout.json", "sentiment-texts.jsonl"):
        assert (tmp_path / rel).read_text() == (EXAMPLES / rel).read_text(), rel
    assert sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file()) < 200_000  # small enough to commit

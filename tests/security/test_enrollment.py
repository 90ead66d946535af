"""Enrollment tokens and ``slmfleet agent enroll``: single use, expiry, revocation, binding, labels, files 0600."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlmodel import Session, select

from agent.runtime.config import load_settings
from agent.runtime.enroll import enroll_main
from controller.auth.tokens import Role
from controller.db.models import AuditEntry, EnrollmentToken, ForgottenDevice, TelemetryRecord
from controller.db.types import utcnow
from controller.settings import ControllerSettings
from controller.telemetry.ingest import TelemetryIn
from tests.conftest import LiveController
from tests.helpers import metric_value
from tests.security import payloads
from wire import codec, topics

INSTALLER = Path(__file__).resolve().parents[2] / "deploy" / "install-agent.sh"


@pytest.fixture
def api(make_controller) -> LiveController:  # type: ignore[no-untyped-def]
    # no broker of its own: enrollment hands out the broker URL it was configured with
    ctl: LiveController = make_controller(None, broker_url=None, device_broker_url="mqtt://127.0.0.1:1")
    return ctl


def new_token(ctl: LiveController, **body: object) -> dict[str, Any]:
    r = ctl.client.post("/api/v1/enrollment-tokens", json=body, headers=ctl.auth)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def test_only_admins_create_list_and_revoke_enrollment_tokens(api: LiveController) -> None:
    assert api.client.post("/api/v1/enrollment-tokens", json={}).status_code == 401
    operator = {"Authorization": f"Bearer {api.token_for(Role.OPERATOR)}"}
    assert api.client.post("/api/v1/enrollment-tokens", json={}, headers=operator).status_code == 403
    assert api.client.get("/api/v1/enrollment-tokens", headers=operator).status_code == 403
    created = new_token(api, labels={"site": "berlin"}, note="line 3")
    assert created["token"].startswith("slmfe_") and created["usable"] is True
    listed = api.client.get("/api/v1/enrollment-tokens", headers=api.auth).json()
    assert [t["id"] for t in listed] == [created["id"]] and "token" not in listed[0]
    with Session(api.runtime.engine) as session:
        row = session.exec(select(EnrollmentToken)).one()
        assert row.token_hash == hashlib.sha256(created["token"].encode()).hexdigest()
        assert created["token"] not in str(row.model_dump())
        actions = [e.action for e in session.exec(select(AuditEntry)).all()]
    assert "enrollment_token.create" in actions
    assert api.client.delete(f"/api/v1/enrollment-tokens/{created['id']}", headers=operator).status_code == 403
    assert api.client.delete(f"/api/v1/enrollment-tokens/{created['id']}", headers=api.auth).status_code == 204
    r = api.client.post("/api/v1/enroll", json={"token": created["token"]})
    assert r.status_code == 403 and "revoked" in r.json()["detail"]
    assert api.client.delete("/api/v1/enrollment-tokens/999", headers=api.auth).status_code == 404


def test_a_token_is_single_use_even_under_concurrent_requests(api: LiveController) -> None:
    token = new_token(api, labels={"tier": "canary"})["token"]

    def attempt(i: int) -> httpx.Response:
        return api.client.post("/api/v1/enroll", json={"token": token, "device_id": f"race-{i}"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(attempt, range(8)))
    ok = [r for r in answers if r.status_code == 200]
    assert len(ok) == 1, [r.status_code for r in answers]
    assert {r.status_code for r in answers if r.status_code != 200} == {403}
    body = ok[0].json()
    assert body["broker_url"] == "mqtt://127.0.0.1:1"
    assert body["mqtt_username"] is None  # broker_auth none: no per-device credentials to hand out
    assert "BEGIN PUBLIC KEY" in body["signing_public_key_pem"]
    device = api.client.get(f"/api/v1/devices/{body['device_id']}").json()
    assert device["labels"] == {"tier": "canary"} and device["enrolled_at"] is not None
    with Session(api.runtime.engine) as session:
        audit = session.exec(select(AuditEntry).where(AuditEntry.action == "device.enroll")).all()
    assert [a.target for a in audit] == [body["device_id"]]


def test_unknown_expired_bound_and_taken_tokens_are_refused(api: LiveController) -> None:
    assert api.client.post("/api/v1/enroll", json={"token": "slmfe_nope"}).status_code == 401
    assert api.client.post("/api/v1/enroll", json={"token": ""}).status_code == 422

    expired = new_token(api)
    with Session(api.runtime.engine) as session:
        row = session.get(EnrollmentToken, expired["id"])
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
        session.add(row)
        session.commit()
    r = api.client.post("/api/v1/enroll", json={"token": expired["token"]})
    assert r.status_code == 403 and "expired" in r.json()["detail"]

    bound = new_token(api, device_id="pump-7")
    r = api.client.post("/api/v1/enroll", json={"token": bound["token"], "device_id": "pump-8"})
    assert r.status_code == 409 and "bound to device pump-7" in r.json()["detail"]
    r = api.client.post("/api/v1/enroll", json={"token": bound["token"]})
    assert r.status_code == 200 and r.json()["device_id"] == "pump-7"

    # an enrolled device cannot be taken over with an unbound token...
    r = api.client.post("/api/v1/enroll", json={"token": new_token(api)["token"], "device_id": "pump-7"})
    assert r.status_code == 409 and "already enrolled" in r.json()["detail"]
    # ...but a token bound to it re-enrolls it (new credentials)
    r = api.client.post("/api/v1/enroll", json={"token": new_token(api, device_id="pump-7")["token"]})
    assert r.status_code == 200

    r = api.client.post("/api/v1/enroll", json={"token": new_token(api)["token"], "device_id": "bad/id"})
    assert r.status_code == 422
    # a refused attempt does not use the token up
    token = new_token(api, device_id="pump-9")["token"]
    assert api.client.post("/api/v1/enroll", json={"token": token, "device_id": "x"}).status_code == 409
    assert api.client.post("/api/v1/enroll", json={"token": token}).status_code == 200


def test_revoking_a_device_needs_an_admin_and_is_audited(api: LiveController) -> None:
    token = new_token(api, device_id="edge-1")["token"]
    assert api.client.post("/api/v1/enroll", json={"token": token}).status_code == 200
    operator = {"Authorization": f"Bearer {api.token_for(Role.OPERATOR)}"}
    assert api.client.post("/api/v1/devices/edge-1/revoke").status_code == 401
    assert api.client.post("/api/v1/devices/edge-1/revoke", headers=operator).status_code == 403
    assert api.client.post("/api/v1/devices/nope/revoke", headers=api.auth).status_code == 404
    r = api.client.post("/api/v1/devices/edge-1/revoke", headers=api.auth)
    assert r.status_code == 200 and r.json() == {"device_id": "edge-1", "revoked": True, "changed": True}
    assert api.client.post("/api/v1/devices/edge-1/revoke", headers=api.auth).json()["changed"] is False
    assert "edge-1" in api.runtime.handler.revoked
    with Session(api.runtime.engine) as session:
        audit = session.exec(select(AuditEntry).where(AuditEntry.action == "device.revoke")).all()
    assert [a.actor for a in audit] == ["test-admin", "test-admin"]


def _audit_details(ctl: LiveController, action: str, target: str) -> list[dict[str, Any]]:
    with Session(ctl.runtime.engine) as session:
        rows = session.exec(select(AuditEntry).where(AuditEntry.action == action, AuditEntry.target == target)).all()
        return [dict(r.detail) for r in rows]


def test_a_revoked_id_comes_back_only_with_a_token_bound_to_it_made_after_the_revocation(api: LiveController) -> None:
    """A probe enrolled as a revoked id with a spare unbound token: 200, the revocation cleared, labels inherited."""
    assert (
        api.client.post("/api/v1/enroll", json={"token": new_token(api, device_id="edge-1")["token"]}).status_code
        == 200
    )
    assert (
        api.client.patch("/api/v1/devices/edge-1", json={"labels": {"tier": "gold"}}, headers=api.auth).status_code
        == 200
    )
    spare = new_token(api)
    bound_before = new_token(api, device_id="edge-1")
    assert api.client.post("/api/v1/devices/edge-1/revoke", headers=api.auth).status_code == 200

    r = api.client.post("/api/v1/enroll", json={"token": spare["token"], "device_id": "edge-1"})
    assert r.status_code == 409 and "edge-1 was revoked at" in r.json()["detail"]
    assert "slmfleet enrollment create --device-id edge-1" in r.json()["detail"]
    r = api.client.post("/api/v1/enroll", json={"token": bound_before["token"]})
    assert r.status_code == 403 and "revoked" in r.json()["detail"]  # revoked together with the device
    device = api.client.get("/api/v1/devices/edge-1").json()
    assert device["revoked_at"] is not None and device["labels"] == {"tier": "gold"}
    assert "edge-1" in api.runtime.handler.revoked
    listed = {t["id"]: t["usable"] for t in api.client.get("/api/v1/enrollment-tokens", headers=api.auth).json()}
    assert listed[spare["id"]] is True and listed[bound_before["id"]] is False  # the refusal used nothing up

    r = api.client.post("/api/v1/enroll", json={"token": new_token(api, device_id="edge-1")["token"]})
    assert r.status_code == 200
    device = api.client.get("/api/v1/devices/edge-1").json()
    assert device["revoked_at"] is None and device["labels"] == {"tier": "gold"}  # revoked, not forgotten: kept
    assert "edge-1" not in api.runtime.handler.revoked
    assert _audit_details(api, "device.enroll", "edge-1")[-1]["restored"] == "revoked"


def test_a_forgotten_device_stays_forgotten_until_an_admin_binds_a_token_to_it(
    private_broker: Any, make_controller: Any
) -> None:
    ctl: LiveController = make_controller(private_broker)
    handler, writer = ctl.runtime.handler, ctl.runtime.writer
    handler(topics.state("dev-f"), codec.encode(payloads.birth()))
    handler(topics.telemetry("dev-f"), codec.encode(payloads.telemetry(1)))
    ctl.flush()
    assert ctl.client.get("/api/v1/devices/dev-f/telemetry").json() != []
    operator = {"Authorization": f"Bearer {ctl.token_for(Role.OPERATOR, 'olga')}"}
    # received just before the forget, still queued: written before the delete, so nothing of it is left behind
    writer.put(TelemetryIn("dev-f", payloads.telemetry(2), time.time()))
    assert ctl.client.delete("/api/v1/devices/dev-f", headers=operator).status_code == 204
    ctl.flush()
    with Session(ctl.runtime.engine) as session:
        assert session.exec(select(TelemetryRecord).where(TelemetryRecord.device_id == "dev-f")).all() == []
        tombstone = session.get(ForgottenDevice, "dev-f")
    assert tombstone is not None and tombstone.forgotten_by == "olga" and not tombstone.was_enrolled

    # its birth (the device still runs, or anyone on an open broker) does not bring it back: dropped, counted
    handler(topics.state("dev-f"), codec.encode(payloads.birth()))
    ctl.flush()
    assert ctl.client.get("/api/v1/devices/dev-f").status_code == 404
    text = ctl.client.get("/metrics").text
    assert metric_value(text, "slmfleet_invalid_payloads_total", {"channel": "state", "reason": "forgotten"}) == 1
    # nor does a spare token
    r = ctl.client.post("/api/v1/enroll", json={"token": new_token(ctl)["token"], "device_id": "dev-f"})
    assert r.status_code == 409 and "dev-f was forgotten at" in r.json()["detail"]
    # a restart keeps it forgotten
    assert "dev-f" in ctl.runtime.enrollment.forgotten
    ctl.runtime.enrollment.load()
    assert "dev-f" in handler.forgotten

    # the admin's explicit act
    r = ctl.client.post("/api/v1/enroll", json={"token": new_token(ctl, device_id="dev-f")["token"]})
    assert r.status_code == 200 and "dev-f" not in handler.forgotten
    handler(topics.state("dev-f"), codec.encode(payloads.birth()))
    ctl.flush()
    assert ctl.client.get("/api/v1/devices/dev-f").json()["status"] == "online"
    assert _audit_details(ctl, "device.enroll", "dev-f")[-1]["restored"] == "forgotten"
    with Session(ctl.runtime.engine) as session:
        assert session.get(ForgottenDevice, "dev-f") is None


def test_agent_enroll_writes_private_files_the_agent_runs_with(live_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = live_server(device_broker_url="mqtts://broker.example:8883")
    r = httpx.post(
        server.url + "/api/v1/enrollment-tokens",
        json={"labels": {"site": "lab", "tier": "canary"}},
        headers={"Authorization": f"Bearer {server.admin_token}"},
        timeout=30.0,
    )
    token_file = tmp_path / "token"
    token_file.write_text(r.json()["token"] + "\n")
    out = tmp_path / "etc"
    args = ["--controller", server.url, "--token-file", str(token_file), "--dir", str(out), "--device-id", "pump-1"]
    assert enroll_main([*args, "--data-dir", str(tmp_path / "state")]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "signing-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "agent.toml").stat().st_mode) == 0o640  # no secret in it
    config = tomllib.loads((out / "agent.toml").read_text())["agent"]
    assert config["device_id"] == "pump-1" and config["broker"] == "mqtts://broker.example:8883"
    assert config["labels"] == {"site": "lab", "tier": "canary"}
    settings = load_settings(out / "agent.toml", {})
    assert settings.device_id == "pump-1" and settings.labels == {"site": "lab", "tier": "canary"}
    assert settings.pinned_key_file() == out / "signing-key.pem"
    assert (out / "signing-key.pem").read_text() == server.runtime.models.key.public_pem

    # enrolled already: refused without --force; a used token is refused with the controller's reason
    assert enroll_main(args) == 2
    assert enroll_main([*args, "--force"]) == 1
    # the controller unreachable: a clear error, nothing written
    gone = tmp_path / "gone"
    assert enroll_main(["--controller", "http://127.0.0.1:1", "--token", "slmfe_x", "--dir", str(gone)]) == 1
    assert not (gone / "agent.toml").exists()


def test_the_enroll_command_names_the_public_url_or_the_address_asked(live_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Behind a reverse proxy the controller's own address is not the devices': ``public_url`` says which."""
    plain = live_server()
    proxied = live_server(public_url="https://fleet.example.com/slmfleet/")
    for server, url in ((plain, plain.url), (proxied, "https://fleet.example.com/slmfleet")):
        headers = {"Authorization": f"Bearer {server.admin_token}"}
        created = httpx.post(server.url + "/api/v1/enrollment-tokens", json={}, headers=headers, timeout=30.0).json()
        assert created["controller_url"] == url
        assert created["enroll_command"] == f"slmfleet agent enroll --controller {url} --token-file TOKEN_FILE"
        assert created["token"] not in created["enroll_command"]
    cli = subprocess.run(
        [sys.executable, "-m", "slmfleet", "enrollment", "create", "--api", proxied.url],
        env={**os.environ, "SLMFLEET_TOKEN": proxied.admin_token},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert "--controller https://fleet.example.com/slmfleet --token-file TOKEN_FILE" in cli.stderr
    assert cli.stdout.strip().startswith("slmfe_")  # the secret alone on stdout, for scripts
    for bad in ("fleet.example.com", "ftp://fleet.example.com", "https://", "https://h/?q=1"):
        with pytest.raises(ValidationError, match="public_url"):
            ControllerSettings(data_dir=tmp_path / "x", public_url=bad)
    # and `slmfleet up` says so in a line (the message holds "[/path]", which is not console markup)
    up = subprocess.run(
        [sys.executable, "-m", "slmfleet", "up", "--data-dir", str(tmp_path / "up")],
        env={**os.environ, "SLMFLEET_PUBLIC_URL": "fleet.example.com"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = up.stdout + up.stderr
    assert up.returncode == 2 and "Traceback" not in out, out
    assert "public_url must be http(s)://host[:port][/path]" in " ".join(out.split()), out


def test_the_installer_enrolls_once_and_keeps_the_enrollment(live_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = live_server(device_broker_url="mqtt://10.9.8.7:1883")
    r = httpx.post(
        server.url + "/api/v1/enrollment-tokens",
        json={"device_id": "gw-3", "labels": {"site": "depot"}},
        headers={"Authorization": f"Bearer {server.admin_token}"},
        timeout=30.0,
    )
    token_file = tmp_path / "token"
    token_file.write_text(r.json()["token"])
    root = tmp_path / "root"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}

    def install(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = ["sh", str(INSTALLER), "--root-dir", str(root), "--no-venv", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)

    first = install("--enroll", server.url, "--enroll-token-file", str(token_file))
    assert first.returncode == 0, first.stdout + first.stderr
    config = tomllib.loads((root / "etc/slmfleet/agent.toml").read_text())["agent"]
    assert config["device_id"] == "gw-3" and config["broker"] == "mqtt://10.9.8.7:1883"
    assert config["data_dir"] == "/var/lib/slmfleet-agent" and config["labels"] == {"site": "depot"}
    key = root / "etc/slmfleet/signing-key.pem"
    assert key.read_text() == server.runtime.models.key.public_pem
    assert (root / "etc/systemd/system/slmfleet-agent.service").is_file()
    # run again (an upgrade): the used token is not presented again, the enrollment is kept
    again = install("--enroll", server.url, "--enroll-token-file", str(token_file))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "is an enrollment already" in again.stdout
    assert tomllib.loads((root / "etc/slmfleet/agent.toml").read_text())["agent"]["device_id"] == "gw-3"
    missing = install("--enroll", server.url)
    assert missing.returncode != 0 and "--enroll-token-file" in missing.stderr


def test_the_embedded_brokers_plugin_file_is_kept_and_checked_against_the_controller_password(
    tmp_path: Path,
) -> None:
    from controller.broker import dynsec
    from controller.errors import BrokerError

    path, secret = dynsec.prepare(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "controller.secret").stat().st_mode) == 0o600
    assert dynsec.controller_password_matches(path, secret) and not dynsec.controller_password_matches(path, "x")
    before = path.read_text()
    assert dynsec.prepare(tmp_path) == (path, secret) and path.read_text() == before  # devices are kept
    (tmp_path / "controller.secret").write_text("not-it\n")
    with pytest.raises(BrokerError, match="does not match"):
        dynsec.prepare(tmp_path)
    (tmp_path / "controller.secret").unlink()
    with pytest.raises(BrokerError, match="is missing"):
        dynsec.prepare(tmp_path)

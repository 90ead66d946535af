"""Revoked and forgotten devices stay out, against real processes: ``slmfleet up`` (with mosquitto's dynamic
security plugin, and on the open embedded broker), real agents, and the operator's CLI.

What a probe found before: a spare unbound enrollment token took over a revoked device id (200, revocation
cleared, labels and history inherited), and a forgotten device re-registered itself from its own birth with
the broker credentials it still had.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from controller.broker import dynsec
from controller.broker.embedded import free_port, mosquitto_binary
from tests.e2e.fleet import ControllerProc, broker_url_from_banner
from tests.helpers import Proc, metric_value, slmfleet_cmd, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        mosquitto_binary() is None or dynsec.plugin_path() is None,
        reason="needs mosquitto and its dynamic security plugin",
    ),
]


def start_controller(tmp_path: Path, *extra: str) -> ControllerProc:
    port = free_port()
    data = tmp_path / "controller"
    up = Proc(
        slmfleet_cmd("up", "--data-dir", str(data), "--port", str(port), "--broker-port", str(free_port()), *extra),
        tmp_path / "controller.log",
    )
    ctl = ControllerProc(up, f"http://127.0.0.1:{port}", data)
    wait_until(
        lambda: up.alive() and httpx.get(ctl.api + "/api/v1/health", timeout=2).json()["broker"]["connected"],
        30,
        what=f"controller up (log: {up.log_path})",
    )
    return ctl


def cli(ctl: ControllerProc, *args: str) -> subprocess.CompletedProcess[str]:
    """The operator's CLI, finding the API and the admin token in the data directory as a user's would."""
    return subprocess.run(
        [*slmfleet_cmd(*args), "--data-dir", str(ctl.data_dir)], capture_output=True, text=True, timeout=60
    )


def new_token(ctl: ControllerProc, path: Path, *args: str) -> Path:
    made = cli(ctl, "enrollment", "create", *args)
    assert made.returncode == 0, made.stderr
    path.write_text(made.stdout.strip())
    return path


def enroll(
    ctl: ControllerProc, token: Path, device_id: str, etc: Path, state: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *slmfleet_cmd("agent", "enroll", "--controller", ctl.api, "--token-file", str(token)),
            *("--dir", str(etc), "--device-id", device_id, "--data-dir", str(state), *extra),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def device(ctl: ControllerProc, device_id: str) -> httpx.Response:
    return ctl.get(f"/api/v1/devices/{device_id}")


def dropped(ctl: ControllerProc, reason: str) -> float:
    return metric_value(ctl.get("/metrics").text, "slmfleet_invalid_payloads_total", {"reason": reason})


def test_a_revoked_or_forgotten_id_comes_back_only_by_an_admins_bound_token(tmp_path: Path) -> None:
    ctl = start_controller(tmp_path, "--broker-auth", "dynsec")
    procs: list[Proc] = [ctl.proc]
    try:
        # edge-1 joins with an ordinary (unbound) token, gets a label from the operator, and runs
        etc, state = tmp_path / "edge-1" / "etc", tmp_path / "edge-1" / "state"
        assert enroll(ctl, new_token(ctl, tmp_path / "t1", "--label", "site=lab"), "edge-1", etc, state).returncode == 0
        agent = Proc(
            slmfleet_cmd("agent", "--config", str(etc / "agent.toml"), "--broker-refused-retry", "1"),
            tmp_path / "edge-1.log",
        )
        procs.append(agent)
        wait_until(lambda: ctl.devices().get("edge-1") == "online", 30, what="edge-1 online")
        assert cli(ctl, "devices", "label", "edge-1", "tier=gold").returncode == 0
        spare_before = new_token(ctl, tmp_path / "spare-before")  # lying around since before the revocation
        bound_before = new_token(ctl, tmp_path / "bound-before", "--device-id", "edge-1")

        revoked = cli(ctl, "devices", "revoke", "edge-1")
        assert revoked.returncode == 0 and "enrollment create --device-id edge-1" in revoked.stdout, revoked.stderr
        wait_until(lambda: "trying the broker again" in agent.log(), 30, what="the revoked agent shut out")

        # whoever holds a spare token cannot take the id: refused, the token is not used up, nothing changes
        attempt = enroll(ctl, spare_before, "edge-1", tmp_path / "x" / "etc", tmp_path / "x" / "state")
        assert attempt.returncode != 0 and "409" in attempt.stderr and "was revoked" in attempt.stderr
        attempt = enroll(ctl, new_token(ctl, tmp_path / "spare-after"), "edge-1", tmp_path / "y", tmp_path / "y2")
        assert attempt.returncode != 0 and "was revoked" in attempt.stderr
        # a token bound to it but made before the revocation was revoked with the device
        attempt = enroll(ctl, bound_before, "edge-1", tmp_path / "z" / "etc", tmp_path / "z" / "state")
        assert attempt.returncode != 0 and "403" in attempt.stderr and "revoked" in attempt.stderr
        body = device(ctl, "edge-1").json()
        assert body["revoked_at"] is not None and body["labels"] == {"site": "lab", "tier": "gold"}
        listed = httpx.get(
            ctl.api + "/api/v1/enrollment-tokens", headers={"Authorization": f"Bearer {ctl.token}"}, timeout=10
        ).json()
        assert sum(t["usable"] for t in listed) == 2  # both spares: a refused attempt does not use a token up

        # forgetting: a device that still has broker credentials is refused (its credentials would keep working)
        procs.append(spare_agent := _enrolled_agent(ctl, tmp_path, "edge-2"))
        wait_until(lambda: ctl.devices().get("edge-2") == "online", 30, what="edge-2 online")
        refused = cli(ctl, "devices", "forget", "edge-2")
        assert refused.returncode == 1 and "409" in refused.stderr and "still has broker credentials" in refused.stderr
        assert device(ctl, "edge-2").status_code == 200
        forgot = cli(ctl, "devices", "forget", "edge-2", "--revoke")  # an admin: revoke, then forget
        assert forgot.returncode == 0, forgot.stderr
        wait_until(lambda: "trying the broker again" in spare_agent.log(), 30, what="the forgotten agent shut out")

        assert cli(ctl, "devices", "forget", "edge-1").returncode == 0  # revoked: no credentials left
        assert device(ctl, "edge-1").status_code == 404
        attempt = enroll(ctl, spare_before, "edge-1", tmp_path / "x" / "etc", tmp_path / "x" / "state")
        assert attempt.returncode != 0 and "was forgotten" in attempt.stderr
        # both agents keep trying with their old passwords: refused by the broker, they never come back by themselves
        broker_log = ctl.data_dir / "broker" / "mosquitto.log"

        def refusals() -> int:
            return broker_log.read_text(errors="replace").count("disconnected, not authorised")

        tries = refusals()
        wait_until(lambda: refusals() >= tries + 4, 30, what="more refused tries")
        assert "edge-1" not in ctl.devices() and "edge-2" not in ctl.devices()

        # an admin's explicit act: a token bound to it, created now, re-enrolls it (new credentials, no old labels)
        bound = new_token(ctl, tmp_path / "bound-after", "--device-id", "edge-1", "--label", "site=lab")
        assert enroll(ctl, bound, "edge-1", etc, state, "--force").returncode == 0  # over its old configuration
        agent.stop(20)
        procs.append(agent := Proc(slmfleet_cmd("agent", "--config", str(etc / "agent.toml")), tmp_path / "e1b.log"))
        wait_until(lambda: ctl.devices().get("edge-1") == "online", 30, what="edge-1 back online")
        body = device(ctl, "edge-1").json()
        assert body["revoked_at"] is None and body["labels"] == {"site": "lab"}
        audit = _audit(ctl, "device.enroll", "edge-1")
        assert audit[-1]["detail"].get("restored") == "forgotten", audit
    finally:
        for proc in reversed(procs):
            proc.stop(20)


def _enrolled_agent(ctl: ControllerProc, tmp_path: Path, device_id: str) -> Proc:
    etc, state = tmp_path / device_id / "etc", tmp_path / device_id / "state"
    done = enroll(ctl, new_token(ctl, tmp_path / f"{device_id}.token"), device_id, etc, state)
    assert done.returncode == 0, done.stderr
    return Proc(
        slmfleet_cmd("agent", "--config", str(etc / "agent.toml"), "--broker-refused-retry", "1"),
        tmp_path / f"{device_id}.log",
    )


def _audit(ctl: ControllerProc, action: str, target: str) -> list[dict[str, object]]:
    from sqlmodel import Session, col, create_engine, select

    from controller.db.models import AuditEntry

    engine = create_engine(f"sqlite:///{ctl.data_dir / 'controller.db'}")
    with Session(engine) as session:
        rows = session.exec(
            select(AuditEntry)
            .where(AuditEntry.action == action, AuditEntry.target == target)
            .order_by(col(AuditEntry.id))
        ).all()
        out = [{"actor": r.actor, "detail": r.detail} for r in rows]
    engine.dispose()
    return out


def test_on_the_open_broker_a_forgotten_devices_birth_does_not_bring_it_back(tmp_path: Path) -> None:
    ctl = start_controller(tmp_path)
    broker = broker_url_from_banner(ctl.proc.log())
    assert broker is not None
    args = ["agent", "--broker", broker, "--device-id", "edge-9", "--data-dir", str(tmp_path / "edge-9")]
    procs = [ctl.proc, Proc(slmfleet_cmd(*args, "--label", "site=lab"), tmp_path / "edge-9.log")]
    try:
        wait_until(lambda: ctl.devices().get("edge-9") == "online", 30, what="edge-9 online")
        forgot = cli(ctl, "devices", "forget", "edge-9")
        assert forgot.returncode == 0, forgot.stderr
        # the agent starts again (a reboot) and sends its birth, with labels it chooses: dropped and counted
        procs[1].stop(20)
        procs.append(Proc(slmfleet_cmd(*args, "--label", "tier=gold"), tmp_path / "edge-9b.log"))
        wait_until(lambda: dropped(ctl, "forgotten") >= 1, 30, what="the forgotten device's birth dropped")
        assert device(ctl, "edge-9").status_code == 404 and "edge-9" not in ctl.devices()
        assert "edge-9 forgotten" in ctl.proc.log() and "forgotten" in ctl.proc.log()
        # the admin takes it back: a token bound to it (here the device's enrollment only lifts the bar: there
        # are no per-device credentials on an open broker)
        bound = new_token(ctl, tmp_path / "bound", "--device-id", "edge-9")
        assert enroll(ctl, bound, "edge-9", tmp_path / "e9" / "etc", tmp_path / "e9" / "state").returncode == 0
        procs[-1].stop(20)
        procs.append(Proc(slmfleet_cmd(*args), tmp_path / "edge-9c.log"))
        wait_until(lambda: ctl.devices().get("edge-9") == "online", 30, what="edge-9 back")
    finally:
        for proc in reversed(procs):
            proc.stop(20)

"""Signed is not the same as meant for you: commands are sealed for one device, expire, and count once.

Real processes: a mosquitto that lets anyone publish (the default open mode), the controller
(``slmfleet up``), agent processes with the controller's key pinned. The attacker is an anonymous
MQTT client that reads what it can (the devices' command topics, the manifests the API serves) and
replays it. Each attack is refused by the agent; what the agent serves (its own HTTP health endpoint)
and what the controller records show it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.broker.embedded import EmbeddedBroker, free_port
from tests.e2e.fleet import ControllerProc, Fleet, served_version
from tests.e2e.test_deploy_real_agents import active_version, deploy, deployment, pin_key, register
from tests.helpers import RawMqtt, wait_until
from wire import chunks as frames
from wire import codec, signing, topics
from wire.manifest import SignedManifest
from wire.messages import Configure, Deploy

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path: Path, private_broker: EmbeddedBroker, requires_mosquitto: None):  # type: ignore[no-untyped-def]
    f = Fleet(tmp_path, private_broker.url)
    yield f
    f.stop()


def refusals(ctl: ControllerProc, device_id: str) -> list[str]:
    events = ctl.get(f"/api/v1/devices/{device_id}/events", params={"limit": 10000}).json()
    return [e["message"] for e in events if e["kind"] == "command_refused"]


def controller_key(ctl: ControllerProc) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key((ctl.data_dir / "keys" / "signing-key.pem").read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def start_agents(fleet: Fleet, ctl: ControllerProc, tmp_path: Path, *names: str) -> dict[str, int]:
    key = pin_key(ctl, tmp_path / "controller.pem")
    ports = {}
    for name in names:
        ports[name] = free_port()
        fleet.start_agent(name, "--signing-key-file", str(key), "--http-port", str(ports[name]))
    fleet.wait_online(list(names), 60)
    return ports


def test_genuine_deploys_and_manifests_replayed_elsewhere_or_later_are_refused(
    fleet: Fleet, tmp_path: Path, private_broker: EmbeddedBroker
) -> None:
    ctl = fleet.start_controller()
    for seed in (1, 2):
        register(ctl, tmp_path, seed)
    ports = start_agents(fleet, ctl, tmp_path, "dev-a", "dev-b")
    attacker = RawMqtt(private_broker.port, "attacker")
    attacker.subscribe(topics.cmd("dev-a"))  # the open broker lets anyone read a device's commands
    attacker.subscribe(f"{topics.ARTIFACT_PREFIX}/#")  # and every chunk broadcast
    attacker.subscribe(topics.events("dev-b"))  # and what devices report
    first = deploy(ctl, 1, ["dev-a", "dev-b"])
    wait_until(lambda: deployment(ctl, first)["status"] == "completed", 90, what="v1 on both devices")
    wait_until(lambda: served_version(ports["dev-a"]) == served_version(ports["dev-b"]) == 1, 30)
    # and the controller knows it (the rollback below goes back to what it recorded as installed)
    wait_until(lambda: active_version(ctl, "dev-a") == 1, 30, what="the controller seeing v1 on dev-a")
    second = deploy(ctl, 2, ["dev-a"])
    wait_until(lambda: deployment(ctl, second)["status"] == "completed", 90, what="v2 on dev-a")
    assert served_version(ports["dev-a"]) == 2

    def deploys_of_second() -> list[bytes]:
        got = [p for _, p, _ in attacker.received(topics.cmd("dev-a"))]
        return [p for p in got if json.loads(p).get("deployment_id") == second]

    captured = wait_until(deploys_of_second, 10, what="dev-a's Deploy of v2 seen by the attacker")
    genuine = json.loads(captured[0])
    assert genuine["type"] == "deploy" and genuine["auth"]["device_id"] == "dev-a"
    v2_id = Deploy.model_validate(genuine).manifest.manifest.artifact_id
    v2 = SignedManifest.model_validate(ctl.get(f"/api/v1/artifacts/{v2_id}/manifest").json())
    chunk_frames = [p for _, p, _ in attacker.received(topics.ARTIFACT_PREFIX) if frames.decode(p).artifact_id == v2_id]
    assert len(chunk_frames) == len(v2.manifest.chunks), "the attacker saw v2's whole broadcast"

    # 1. dev-a's genuine, signed Deploy of v2, replayed to dev-b, with v2's chunks
    attacker.publish(topics.cmd("dev-b"), captured[0])
    # 2. a Deploy the attacker wrote around the genuine signed v2 manifest (read from the API), unsigned
    forged = Deploy(ts=time.time(), command_id="evil-1", deployment_id="evil-dep-1", manifest=v2)
    attacker.publish(topics.cmd("dev-b"), codec.encode(forged))
    # 3. the same, with an auth block copied from dev-a's genuine command
    stolen = {**json.loads(codec.encode(forged)), "auth": genuine["auth"]}
    attacker.publish(topics.cmd("dev-b"), json.dumps(stolen).encode())
    for frame in chunk_frames:
        attacker.publish(topics.artifact_chunks(v2_id), frame)
        attacker.publish(topics.chunks("dev-b"), frame)
    wait_until(lambda: any("wrong_device" in m for m in refusals(ctl, "dev-b")), 20, what="dev-b refusing")
    wait_until(lambda: any("bad_signature" in m for m in refusals(ctl, "dev-b")), 20, what="a stolen auth refused")

    def evil_reports() -> list[dict[str, Any]]:
        reports = [json.loads(p) for _, p, _ in attacker.received(topics.events("dev-b"))]
        return [r for r in reports if r.get("deployment_id") == "evil-dep-1"]

    # the unsigned Deploy is a deployment this agent can never accept: it says so (and nothing else)
    wait_until(evil_reports, 20, what="dev-b reporting the unsigned Deploy")
    assert [(r["state"], r["reason"].split(":")[0]) for r in evil_reports()] == [("failed", "unsigned")]
    assert served_version(ports["dev-b"]) == 1, "dev-b installed a version never deployed to it"
    assert "wrong_device" in fleet.agents["dev-b"].log()

    # 4. later: the controller's own command, captured an hour and a half ago (now expired), for a new deployment
    key = controller_key(ctl)
    old = Deploy(ts=time.time() - 5400, command_id="late-1", deployment_id="late-dep-1", manifest=v2)
    expired = signing.seal_command(old, key, device_id="dev-b", now=time.time() - 5400, ttl_s=3600)
    attacker.publish(topics.cmd("dev-b"), expired)
    wait_until(lambda: any("expired" in m for m in refusals(ctl, "dev-b")), 20, what="the expired command refused")

    # 5. later still: dev-a rolled back, then its genuine Deploy of v2 replayed to it after an agent restart
    r = httpx.post(
        ctl.api + f"/api/v1/deployments/{second}/rollback",
        headers={"Authorization": f"Bearer {ctl.token}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    wait_until(lambda: served_version(ports["dev-a"]) == 1, 60, what="dev-a rolled back to v1")
    fleet.agents["dev-a"].stop()
    pinned = str(tmp_path / "controller.pem")
    fleet.start_agent("dev-a", "--signing-key-file", pinned, "--http-port", str(ports["dev-a"]))
    wait_until(lambda: served_version(ports["dev-a"]) == 1, 60, what="dev-a back after its restart")
    attacker.publish(topics.cmd("dev-a"), captured[0])
    wait_until(lambda: any("replay" in m for m in refusals(ctl, "dev-a")), 20, what="the replay refused")
    assert served_version(ports["dev-a"]) == served_version(ports["dev-b"]) == 1
    attacker.close()


def test_unsigned_and_replayed_configure_are_refused_and_the_signed_one_obeyed(
    fleet: Fleet, tmp_path: Path, private_broker: EmbeddedBroker
) -> None:
    ctl = fleet.start_controller()
    start_agents(fleet, ctl, tmp_path, "dev-c")
    auth = {"Authorization": f"Bearer {ctl.token}"}

    def interval() -> float:
        return float(ctl.get("/api/v1/devices/dev-c").json()["telemetry_interval_s"])

    assert interval() == 10.0
    attacker = RawMqtt(private_broker.port, "attacker")
    attacker.subscribe(topics.cmd("dev-c"))

    # the operator's configure: sealed for dev-c by the controller, obeyed (the birth announces the interval)
    r = httpx.post(
        ctl.api + "/api/v1/devices/dev-c/configure", json={"telemetry_interval_s": 30}, headers=auth, timeout=30.0
    )
    assert r.status_code == 202, r.text
    wait_until(lambda: interval() == 30.0, 20, what="the signed configure obeyed")
    captured = wait_until(lambda: [p for t, p, _ in attacker.received(topics.cmd("dev-c"))], 10)[0]

    # an anonymous client's unsigned configure to 0.1 s: refused
    unsigned = Configure(ts=time.time(), command_id="x", telemetry_interval_s=0.1)
    attacker.publish(topics.cmd("dev-c"), codec.encode(unsigned))
    wait_until(lambda: any("unsigned" in m for m in refusals(ctl, "dev-c")), 20, what="the unsigned configure refused")

    # the operator changes it again; the attacker replays the captured (genuine) configure: refused
    r = httpx.post(
        ctl.api + "/api/v1/devices/dev-c/configure", json={"telemetry_interval_s": 20}, headers=auth, timeout=30.0
    )
    assert r.status_code == 202, r.text
    wait_until(lambda: interval() == 20.0, 20, what="the second signed configure obeyed")
    attacker.publish(topics.cmd("dev-c"), captured)
    wait_until(lambda: any("replay" in m for m in refusals(ctl, "dev-c")), 20, what="the replayed configure refused")
    assert interval() == 20.0
    acks = [e for e in ctl.get("/api/v1/devices/dev-c/events").json() if e["type"] == "ack"]
    assert [a["data"]["ok"] for a in acks] == [True, True], acks
    attacker.close()

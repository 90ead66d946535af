"""Per-device broker credentials and ACLs against a real mosquitto with its dynamic security plugin.

The controller (in process) administers the plugin; devices are enrolled
through the REST API and then connect with their own credentials. Each check
uses MQTT 5 reason codes (the broker says "Not authorized") and an observer
that must never see a forged message, with a marker message to know that
everything sent before it has been routed.
"""

from __future__ import annotations

import getpass
import stat
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session, select

from controller.broker import dynsec
from controller.broker.embedded import EmbeddedBroker, free_port, mosquitto_binary, port_open
from controller.db.models import TelemetryRecord
from tests.conftest import LiveController
from tests.helpers import Proc, metric_value, slmfleet_cmd, wait_until
from wire import codec, topics
from wire.messages import Telemetry

pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None or dynsec.plugin_path() is None,
    reason="needs mosquitto and its dynamic security plugin",
)

SHA = "ab" * 32
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Client:
    """A paho MQTT 5 client that records what the broker answered."""

    client: mqtt.Client
    connack: list[str] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    subacks: dict[int, str] = field(default_factory=dict)
    pubacks: dict[int, str] = field(default_factory=dict)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def subscribe(self, filter_: str) -> str:
        _, mid = self.client.subscribe(filter_, qos=1)
        return wait_until(lambda: self.subacks.get(mid), 10, what=f"SUBACK for {filter_}")

    def publish(self, topic: str, payload: bytes = b"{}") -> str:
        info = self.client.publish(topic, payload, qos=1)
        return wait_until(lambda: self.pubacks.get(info.mid), 10, what=f"PUBACK for {topic}")

    def topics_seen(self) -> list[str]:
        with self.lock:
            return [t for t, _ in self.messages]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(broker: EmbeddedBroker, username: str | None, password: str | None, client_id: str) -> Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.reconnect_delay_set(30, 60)  # a refused client stays refused in these tests: no quick retries
    if username is not None:
        c.username_pw_set(username, password)
    rec = Client(c)
    c.on_connect = lambda _c, _u, _f, rc, _p: rec.connack.append(str(rc))
    c.on_disconnect = lambda _c, _u, _f, rc, _p: rec.disconnects.append(str(rc))
    c.on_subscribe = lambda _c, _u, mid, rcs, _p: rec.subacks.__setitem__(mid, str(rcs[0]))
    c.on_publish = lambda _c, _u, mid, rc, _p: rec.pubacks.__setitem__(mid, str(rc))

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with rec.lock:
            rec.messages.append((msg.topic, msg.payload))

    c.on_message = on_message
    c.connect(broker.host, broker.port)
    c.loop_start()
    wait_until(lambda: rec.connack, 10, what=f"CONNACK for {client_id}")
    return rec


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[tuple[EmbeddedBroker, str]]:
    dynsec_file, secret = dynsec.prepare(tmp_path / "broker")
    broker = EmbeddedBroker(tmp_path / "broker", engine="mosquitto", dynsec_file=dynsec_file)
    broker.start()
    yield broker, secret
    broker.stop()


@pytest.fixture
def secure(secure_broker: tuple[EmbeddedBroker, str], make_controller) -> LiveController:  # type: ignore[no-untyped-def]
    broker, secret = secure_broker
    ctl: LiveController = make_controller(
        broker, broker_auth="dynsec", mqtt_username=dynsec.CONTROLLER_USER, mqtt_password=secret
    )
    return ctl


def enroll(ctl: LiveController, device_id: str, **token: object) -> dict[str, Any]:
    r = ctl.client.post("/api/v1/enrollment-tokens", json={"device_id": device_id, **token}, headers=ctl.auth)
    assert r.status_code == 201, r.text
    r = ctl.client.post("/api/v1/enroll", json={"token": r.json()["token"]})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    assert answer["mqtt_username"] == device_id and answer["mqtt_password"]
    return answer


def device_client(ctl: LiveController, answer: dict[str, Any]) -> Client:
    c = connect(ctl.broker, answer["mqtt_username"], answer["mqtt_password"], answer["device_id"])
    assert c.connack == ["Success"], c.connack
    return c


def test_anonymous_wrong_password_and_borrowed_client_id_are_refused(secure: LiveController) -> None:
    a = enroll(secure, "dev-a")
    enroll(secure, "dev-b")
    refused = [
        connect(secure.broker, None, None, "anon-1"),
        connect(secure.broker, "dev-a", "not-the-password", "dev-a"),
        connect(secure.broker, "dev-a", a["mqtt_password"], "dev-b"),  # A's credentials, B's session
        connect(secure.broker, "dev-a", a["mqtt_password"], f"x-{uuid.uuid4().hex[:6]}"),
    ]
    try:
        for c in refused:
            assert c.connack == ["Not authorized"], c.connack
    finally:
        for c in refused:
            c.client.loop_stop()
    ok = device_client(secure, a)
    ok.stop()


def test_a_device_cannot_act_as_another_or_as_the_controller(secure: LiveController) -> None:
    a = device_client(secure, enroll(secure, "dev-a"))
    b = device_client(secure, enroll(secure, "dev-b"))
    observer = connect(secure.broker, dynsec.CONTROLLER_USER, _controller_password(secure), "observer")
    try:
        assert observer.subscribe(f"{topics.ROOT}/#") == "Granted QoS 1"

        # A may not publish anything as B, nor commands or chunks at all
        forged = [topics.device("dev-b", ch) for ch in dynsec.DEVICE_PUBLISH]
        forged += [topics.cmd("dev-a"), topics.cmd("dev-b"), topics.chunks("dev-a"), topics.artifact_chunks(SHA)]
        for topic in forged:
            assert a.publish(topic) == "Not authorized", topic
        # ...and what it may publish goes through (the marker: everything before it was routed)
        for ch in dynsec.DEVICE_PUBLISH:
            assert a.publish(topics.device("dev-a", ch)) in ("Success", "No matching subscribers")
        wait_until(lambda: topics.results("dev-a") in observer.topics_seen(), 10, what="A's own messages")
        assert not set(forged) & set(observer.topics_seen())

        # A may not read B's commands, the whole tree, or an artifact it was not given
        for filter_ in (
            topics.cmd("dev-b"),
            topics.chunks("dev-b"),
            f"{topics.DEVICE_PREFIX}/+/cmd",
            f"{topics.ROOT}/#",
            "#",
            topics.artifact_chunks(SHA),
        ):
            assert a.subscribe(filter_) == "Not authorized", filter_
        assert a.subscribe(topics.cmd("dev-a")) == "Granted QoS 1"
        assert b.subscribe(topics.cmd("dev-b")) == "Granted QoS 1"
        observer.publish(topics.cmd("dev-b"), b'{"for": "b"}')
        observer.publish(topics.cmd("dev-a"), b'{"for": "a"}')
        wait_until(lambda: topics.cmd("dev-a") in a.topics_seen(), 10, what="A's own command")
        wait_until(lambda: topics.cmd("dev-b") in b.topics_seen(), 10, what="B's own command")
        assert topics.cmd("dev-b") not in a.topics_seen()

        # deploying an artifact to A lets A (and only A) read its chunk broadcast
        assert secure.runtime.broker_admin is not None
        secure.runtime.broker_admin.grant_artifact("dev-a", SHA)
        assert a.subscribe(topics.artifact_chunks(SHA)) == "Granted QoS 1"
        assert b.subscribe(topics.artifact_chunks(SHA)) == "Not authorized"
        assert not a.disconnects, "adding an ACL must not disconnect the device"
    finally:
        for c in (a, b, observer):
            c.stop()


def test_revoked_device_is_disconnected_refused_and_ignored(secure: LiveController) -> None:
    answer = enroll(secure, "dev-r")
    c = device_client(secure, answer)
    try:
        r = secure.client.post("/api/v1/devices/dev-r/revoke", headers=secure.auth)
        assert r.status_code == 200 and r.json()["changed"] is True, r.text
        wait_until(lambda: c.disconnects, 10, what="the revoked device disconnected by the broker")
    finally:
        c.client.loop_stop()
    again = connect(secure.broker, "dev-r", answer["mqtt_password"], "dev-r")
    again.client.loop_stop()
    assert again.connack == ["Not authorized"]

    # whatever still reaches the controller from it (e.g. queued before the revocation) is ignored
    runtime = secure.runtime
    telemetry = Telemetry(ts=1.0, seq=1, interval_s=10, uptime_s=5, cpu_percent=1, rss_bytes=1)
    runtime.handler(topics.telemetry("dev-r"), codec.encode(telemetry))
    text = secure.client.get("/metrics").text
    assert metric_value(text, "slmfleet_invalid_payloads_total", {"channel": "telemetry", "reason": "revoked"}) == 1
    with Session(runtime.engine) as session:
        assert session.exec(select(TelemetryRecord).where(TelemetryRecord.device_id == "dev-r")).all() == []
    device = secure.client.get("/api/v1/devices/dev-r").json()
    assert device["revoked_at"] is not None and device["status"] == "offline"
    # a deployment cannot name it
    r = secure.client.post(
        "/api/v1/deployments",
        json={"model": "m", "version": 1, "target": {"devices": ["dev-r"]}},
        headers=secure.auth,
    )
    assert r.status_code in (404, 409), r.text

    # a new token bound to it brings it back with new credentials; the old password stays dead
    fresh = enroll(secure, "dev-r")
    assert fresh["mqtt_password"] != answer["mqtt_password"]
    back = device_client(secure, fresh)
    back.stop()
    assert "dev-r" not in runtime.handler.revoked


def _controller_password(ctl: LiveController) -> str:
    password = ctl.runtime.settings.mqtt_password
    assert password is not None
    return password


def test_the_shipped_mosquitto_config_secures_a_broker_prepared_by_init_dynsec(
    tmp_path: Path,
    make_controller,  # type: ignore[no-untyped-def]
) -> None:
    dyn_file, password_file = tmp_path / "dynamic-security.json", tmp_path / "controller-mqtt-password"
    done = subprocess.run(
        slmfleet_cmd("broker", "init-dynsec", "--file", str(dyn_file), "--password-file", str(password_file)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600 and stat.S_IMODE(dyn_file.stat().st_mode) == 0o600
    again = subprocess.run(
        slmfleet_cmd("broker", "init-dynsec", "--file", str(dyn_file), "--password-file", str(password_file)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2 and "exists" in again.stderr  # never silently drops enrolled devices

    port = free_port()
    shipped = (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    conf = (
        shipped.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1")
        .replace("plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so", f"plugin {dynsec.plugin_path()}")
        .replace("/var/lib/mosquitto/dynamic-security.json", str(dyn_file))
        .replace("persistence_location /var/lib/mosquitto/", f"persistence_location {tmp_path}/")
        .replace("log_dest syslog", f"log_dest file {tmp_path}/mosquitto.log")
    )
    assert conf.count(str(tmp_path)) >= 3, "the shipped configuration changed: update this test"
    conf += f"\nuser {getpass.getuser()}\n"
    (tmp_path / "mosquitto.conf").write_text(conf)
    broker = Proc([str(mosquitto_binary()), "-c", str(tmp_path / "mosquitto.conf")], tmp_path / "mosquitto.out")
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 15, what=f"mosquitto up ({broker.log_path})")
        external = SimpleNamespace(url=f"mqtt://127.0.0.1:{port}", engine="mosquitto", host="127.0.0.1", port=port)
        ctl: LiveController = make_controller(
            external,
            broker_auth="dynsec",
            mqtt_username=dynsec.CONTROLLER_USER,
            mqtt_password=password_file.read_text().strip(),
        )
        device = device_client(ctl, enroll(ctl, "site-1"))
        assert device.publish(topics.state("site-2")) == "Not authorized"
        device.stop()
        anonymous = connect(ctl.broker, None, None, "anon")
        anonymous.client.loop_stop()
        assert anonymous.connack == ["Not authorized"]
    finally:
        broker.stop(10)


def test_fleet_wide_artifact_access_lets_enrolled_devices_read_any_broadcast_and_nothing_more(
    secure_broker: tuple[EmbeddedBroker, str],
    make_controller,  # type: ignore[no-untyped-def]
) -> None:
    broker, secret = secure_broker
    settings = {"broker_auth": "dynsec", "mqtt_username": dynsec.CONTROLLER_USER, "mqtt_password": secret}
    ctl: LiveController = make_controller(broker, broker_artifact_acl="fleet", **settings)
    a = device_client(ctl, enroll(ctl, "dev-a"))
    try:
        assert ctl.runtime.delivery.grant_artifact is None  # nothing changes at the broker per deployment
        wait_until(lambda: a.subscribe(topics.artifact_chunks(SHA)) == "Granted QoS 1", 10, what="fleet-wide grant")
        assert a.subscribe(topics.cmd("dev-b")) == "Not authorized"
        assert a.publish(topics.artifact_chunks(SHA)) == "Not authorized"
    finally:
        a.stop()
    # back to per-deployment grants: the shared role loses the fleet-wide ACL at the next start
    ctl.client.__exit__(None, None, None)
    again: LiveController = make_controller(broker, data_dir=ctl.runtime.settings.data_dir, **settings)
    b = device_client(again, enroll(again, "dev-b"))
    try:
        wait_until(lambda: b.subscribe(topics.artifact_chunks(SHA)) == "Not authorized", 10, what="grant removed")
    finally:
        b.stop()


def test_enrollment_while_the_broker_is_down_fails_cleanly_and_credentials_survive_a_broker_restart(
    secure: LiveController,
) -> None:
    answer = enroll(secure, "dev-a")
    admin = secure.runtime.broker_admin
    assert admin is not None
    admin.timeout_s = 2.0
    secure.broker.stop()
    r = secure.client.post("/api/v1/enrollment-tokens", json={"device_id": "dev-late"}, headers=secure.auth)
    token = r.json()["token"]
    refused = secure.client.post("/api/v1/enroll", json={"token": token})
    assert refused.status_code == 503 and "did not create the device's credentials" in refused.json()["detail"]
    assert "not connected to the broker" in refused.json()["detail"]
    listed = {t["device_id"]: t for t in secure.client.get("/api/v1/enrollment-tokens", headers=secure.auth).json()}
    assert listed["dev-late"]["usable"] is True  # not used up by the failed attempt

    secure.broker.start()  # same port, same plugin file
    bridge = secure.runtime.bridge
    assert bridge is not None
    wait_until(lambda: bridge.connected, 30, what="controller reconnected")
    again = device_client(secure, answer)  # enrolled before the restart: still in
    again.stop()
    r = secure.client.post("/api/v1/enroll", json={"token": token})
    assert r.status_code == 200, r.text
    device_client(secure, r.json()).stop()

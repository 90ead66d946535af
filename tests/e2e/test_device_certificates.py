"""Devices authenticate to the broker with client certificates (mutual TLS): ``slmfleet up --device-certificates
--broker-auth dynsec``, agents enrolled with ``slmfleet agent enroll`` (their keys made on the device), a
certificate rotated before it expires while the agent keeps working, and a revoked device refused by the broker's
reloaded CRL."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from agent.runtime import identity
from controller.broker import dynsec
from controller.broker.embedded import free_port, mosquitto_binary
from controller.pki.authority import Authority, key_pem, pem
from tests.e2e.fleet import ControllerProc, start_up
from tests.helpers import Proc, slmfleet_cmd, wait_until
from wire import topics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        mosquitto_binary() is None or dynsec.plugin_path() is None,
        reason="needs mosquitto and its dynamic security plugin",
    ),
]


class TlsClient:
    """A raw MQTT 5 client with (or without) a client certificate: did the broker let it in, what did it say."""

    def __init__(self, port: int, ca: Path, cert: Path | None, key: Path | None, client_id: str) -> None:
        self.connected = threading.Event()
        self.acks: dict[int, str] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None)
        self.client.on_connect = lambda c, u, f, reason, p: reason == 0 and self.connected.set()
        self.client.on_publish = lambda c, u, mid, reason, p: self.acks.__setitem__(mid, str(reason))
        self.refused: str | None = None
        try:
            self.client.connect("127.0.0.1", port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:
            self.refused = repr(exc)
            return
        self.client.loop_start()
        if not self.connected.wait(5):
            self.refused = "no CONNACK"

    def publish(self, topic: str) -> str:
        info = self.client.publish(topic, b"{}", qos=1)
        wait_until(lambda: info.mid in self.acks, 10, what="PUBACK")
        return self.acks[info.mid]

    def close(self) -> None:
        if self.refused is None:
            self.client.loop_stop()
            self.client.disconnect()


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number


def revoked_serials(ctl: ControllerProc) -> set[int]:
    crl = x509.load_pem_x509_crl(ctl.get("/api/v1/pki/crl").content)
    return {r.serial_number for r in crl}


def test_client_certificates_rotate_without_downtime_and_revocation_shuts_the_device_out(tmp_path: Path) -> None:
    ctl = start_up(
        tmp_path,
        *("--broker-auth", "dynsec", "--device-certificates"),
        env={"SLMFLEET_DEVICE_CERT_HOURS": "0.02"},  # 72 s: agents renew after about 30 s
    )
    up, broker_port = ctl.proc, ctl.broker_port
    assert broker_port is not None
    procs = [up]
    try:
        assert f"mqtts://127.0.0.1:{broker_port}" in up.log()
        auth = {"Authorization": f"Bearer {ctl.token}"}

        def enroll(device_id: str) -> Path:
            token = httpx.post(ctl.api + "/api/v1/enrollment-tokens", json={}, headers=auth, timeout=30.0).json()[
                "token"
            ]
            (tmp_path / f"{device_id}.token").write_text(token)
            etc = tmp_path / device_id / "etc"
            done = subprocess.run(
                [
                    *slmfleet_cmd(
                        "agent", "enroll", "--controller", ctl.api, "--token-file", str(tmp_path / f"{device_id}.token")
                    ),
                    *("--dir", str(etc), "--device-id", device_id, "--data-dir", str(tmp_path / device_id / "state")),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            assert "with a client certificate" in done.stdout
            assert stat.S_IMODE((etc / "client.key").stat().st_mode) == 0o600
            assert "mqtt_password_file" not in (etc / "agent.toml").read_text(), "the certificate is the credential"
            return etc

        etc = {d: enroll(d) for d in ("edge-1", "edge-2")}
        http = {d: free_port() for d in etc}
        for d in etc:
            procs.append(
                Proc(
                    slmfleet_cmd(
                        "agent",
                        "--config",
                        str(etc[d] / "agent.toml"),
                        "--reconnect-max",
                        "1",
                        "--telemetry-interval",
                        "1",
                        "--http-port",
                        str(http[d]),
                    ),
                    tmp_path / f"{d}.log",
                )
            )
        wait_until(lambda: ctl.devices() == {"edge-1": "online", "edge-2": "online"}, 30, what="agents over mTLS")
        ca = etc["edge-1"] / "broker-ca.pem"

        # no certificate, or one from another CA: refused in the TLS handshake
        for cert, key in ((None, None), _foreign_cert(tmp_path)):
            intruder = TlsClient(broker_port, ca, cert, key, "intruder")
            assert intruder.refused is not None
            intruder.close()
        # edge-2's certificate is edge-2, whatever client id it asks for: edge-1's topics stay closed to it
        borrower = TlsClient(broker_port, ca, etc["edge-2"] / "client.pem", etc["edge-2"] / "client.key", "edge-1")
        assert borrower.refused is None
        assert borrower.publish(topics.telemetry("edge-1")) == "Not authorized"
        borrower.close()

        # rotation: edge-1 renews before expiry and reconnects with the new certificate; it never goes offline
        current = tmp_path / "edge-1" / "state" / "tls" / "current"
        before = current.read_text().strip() if current.is_file() else None
        old_cert = current.parent / f"client-{before}.pem" if before else etc["edge-1"] / "client.pem"
        old_serial = serial_of(old_cert)
        statuses: set[str] = set()

        def rotated() -> bool:
            statuses.add(ctl.devices()["edge-1"])
            now = current.read_text().strip() if current.is_file() else None
            return now not in (None, before) and old_serial in revoked_serials(ctl)

        wait_until(rotated, 90, interval=0.5, what="edge-1's certificate renewed and the old one revoked")
        assert statuses == {"online"}, statuses
        renewed = current.parent / f"client-{current.read_text().strip()}.pem"
        assert serial_of(renewed) != old_serial
        assert httpx.get(f"http://127.0.0.1:{http['edge-1']}/v1/health", timeout=5).json()["broker_connected"]
        seen = len(ctl.get("/api/v1/devices/edge-1/telemetry").json())
        wait_until(lambda: len(ctl.get("/api/v1/devices/edge-1/telemetry").json()) > seen + 2, 20, what="telemetry")
        # the superseded certificate is in the CRL the broker reloaded: it no longer gets in
        old_key = old_cert.with_suffix(".key") if before else etc["edge-1"] / "client.key"
        old = TlsClient(broker_port, ca, old_cert, old_key, "edge-1-old")
        assert old.refused is not None
        old.close()

        # revocation: disconnected at once (dynsec), and its certificate refused from now on (the CRL)
        edge2_cert = etc["edge-2"] / "client.pem"
        renewed2 = tmp_path / "edge-2" / "state" / "tls" / "current"
        r = httpx.post(ctl.api + "/api/v1/devices/edge-2/revoke", headers=auth, timeout=10)
        assert r.status_code == 200, r.text
        pair = (edge2_cert, etc["edge-2"] / "client.key")
        if renewed2.is_file():
            serial = renewed2.read_text().strip()
            pair = (renewed2.parent / f"client-{serial}.pem", renewed2.parent / f"client-{serial}.key")
        wait_until(lambda: serial_of(pair[0]) in revoked_serials(ctl), 10, what="edge-2's certificate in the CRL")
        revoked = TlsClient(broker_port, ca, *pair, "edge-2")
        assert revoked.refused is not None, "a revoked certificate still gets in"
        revoked.close()
        assert ctl.devices()["edge-1"] == "online"
    finally:
        for proc in reversed(procs):
            proc.stop(20)


def _foreign_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for edge-1 from a CA the broker does not trust."""
    other = Authority.load_or_create(tmp_path / "foreign")
    key = identity.new_key()
    cert = other.issue_client("edge-1", key.public_key(), dt.timedelta(hours=1))
    (tmp_path / "foreign" / "c.pem").write_text(pem(cert))
    (tmp_path / "foreign" / "c.key").write_bytes(key_pem(key))
    return tmp_path / "foreign" / "c.pem", tmp_path / "foreign" / "c.key"

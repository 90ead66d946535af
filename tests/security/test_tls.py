"""Transport security: MQTT over TLS and HTTPS, with certificates made here; clients verify by default."""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import ipaddress
import os
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.transport.mqtt import MqttConfig, MqttTransport, parse_broker_url
from controller.broker.embedded import free_port, mosquitto_binary, mosquitto_config
from controller.cli.client import ApiClient
from controller.errors import SettingsError
from controller.settings import load_settings
from tests.e2e.fleet import ControllerProc
from tests.helpers import Proc, slmfleet_cmd, wait_until

# ------------------------------------------------------------ certificates --


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


@dataclass
class Pki:
    ca: Path  # signed the server certificate
    rogue_ca: Path  # did not
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = make_ca("slmfleet test CA")
    _, rogue_cert = make_ca("someone else's CA")
    key, cert = make_server_cert(ca_key, ca_cert)
    return Pki(
        ca=_write_cert(ca_cert, d / "ca.pem"),
        rogue_ca=_write_cert(rogue_cert, d / "rogue-ca.pem"),
        cert=_write_cert(cert, d / "server.pem"),
        key=_write_key(key, d / "server.key"),
    )


# ------------------------------------------------------------------ fleet --


@dataclass
class TlsFleet:
    root: Path
    broker_url: str
    controller: ControllerProc
    pki: Pki

    def ca_context(self, ca: Path | None = None) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(ca or self.pki.ca))

    def devices(self) -> dict[str, str]:
        r = httpx.get(
            self.controller.api + "/api/v1/devices", params={"limit": 1000}, verify=self.ca_context(), timeout=5
        )
        return {d["id"]: d["status"] for d in r.json()["items"]}

    def agent(self, device_id: str, ca: Path) -> Proc:
        return Proc(
            slmfleet_cmd(
                "agent",
                "--broker",
                self.broker_url,
                "--ca-file",
                str(ca),
                "--device-id",
                device_id,
                "--data-dir",
                str(self.root / device_id),
                "--reconnect-max",
                "1",
            ),
            self.root / f"{device_id}.log",
        )


@pytest.fixture(scope="module")
def tls_fleet(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsFleet]:
    """mosquitto with only a TLS listener (our own config), and ``slmfleet up`` on HTTPS connecting over TLS."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("no mosquitto binary: install mosquitto to test MQTT over TLS")
    root = tmp_path_factory.mktemp("tls-fleet")
    state = root / "broker"
    state.mkdir()
    mqtt_port = free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                f"listener {mqtt_port} 127.0.0.1",
                f"certfile {pki.cert}",
                f"keyfile {pki.key}",
                "allow_anonymous true",
                "persistence false",
                f"log_dest file {state}/mosquitto.log",
                "log_type all",
                # mosquitto started as root drops to user 'mosquitto', which cannot read pytest's 0700 dirs.
                f"user {'root' if os.geteuid() == 0 else getpass.getuser()}",
            ]
        )
        + "\n"
    )
    broker = Proc([binary, "-c", str(conf)], root / "mosquitto.stderr")
    controller: Proc | None = None
    try:
        broker_url = f"mqtts://127.0.0.1:{mqtt_port}"
        wait_until(
            lambda: _tcp_open(mqtt_port) or (not broker.alive() and pytest.fail(f"mosquitto exited: {broker.log()}")),
            10,
            what=f"mosquitto TLS listener (log: {broker.log_path})",
        )
        http_port = free_port()
        data = root / "controller"
        controller = Proc(
            slmfleet_cmd(
                "up",
                "--data-dir",
                str(data),
                "--broker",
                broker_url,
                "--port",
                str(http_port),
                "--tls-cert-file",
                str(pki.cert),
                "--tls-key-file",
                str(pki.key),
            ),
            root / "controller.log",
            env={"SLMFLEET_BROKER_CA_FILE": str(pki.ca), "SLMFLEET_TLS_CA_FILE": str(pki.ca)},
        )
        api = f"https://127.0.0.1:{http_port}"
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctl = controller
        wait_until(
            lambda: (
                ctl.alive() and httpx.get(api + "/api/v1/health", verify=ctx, timeout=2).json()["broker"]["connected"]
            ),
            30,
            what=f"controller up on HTTPS, connected over mqtts (log: {controller.log_path})",
        )
        yield TlsFleet(root, broker_url, ControllerProc(controller, api, data), pki)
    finally:
        if controller is not None:
            controller.stop(20)
        broker.stop(10)


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------ tests --


def test_agent_with_the_right_ca_connects_over_tls_and_is_online(tls_fleet: TlsFleet) -> None:
    agent = tls_fleet.agent("tls-good-1", tls_fleet.pki.ca)
    try:
        wait_until(lambda: tls_fleet.devices().get("tls-good-1") == "online", 20, what="TLS agent online")
    finally:
        agent.stop(10)


def test_agent_with_a_ca_that_did_not_sign_the_broker_does_not_connect(tls_fleet: TlsFleet) -> None:
    agent = tls_fleet.agent("tls-rogue-1", tls_fleet.pki.rogue_ca)
    try:
        wait_until(
            lambda: "certificate" in agent.log() and "rejected" in agent.log(),
            20,
            what=f"a certificate error in the agent's log ({agent.log_path})",
        )
        assert "unable to get local issuer certificate" in agent.log()
        assert agent.alive(), "the agent keeps retrying with backoff instead of exiting"
        assert "tls-rogue-1" not in tls_fleet.devices()
    finally:
        agent.stop(10)
    assert "tls-rogue-1" not in tls_fleet.devices()


def test_https_api_verifies_with_the_ca_and_fails_without_it(tls_fleet: TlsFleet) -> None:
    api = tls_fleet.controller.api
    assert httpx.get(api + "/api/v1/health", verify=tls_fleet.ca_context(), timeout=5).status_code == 200
    for verify in (True, tls_fleet.ca_context(tls_fleet.pki.rogue_ca)):  # system CAs; a CA that did not sign
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(api + "/api/v1/health", verify=verify, timeout=5)
    # The CLI client finds the https URL and the CA in controller.json, and verifies with it.
    client = ApiClient(None, None, tls_fleet.controller.data_dir)
    assert client.base == api
    assert client.request("GET", "/api/v1/health")["broker"]["connected"]


def test_cli_client_verifies_by_default(tls_fleet: TlsFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    monkeypatch.delenv("SLMFLEET_CA_FILE", raising=False)
    without_ca = ApiClient(tls_fleet.controller.api, "t", tmp_path)  # no controller.json here: system CAs
    with pytest.raises(typer.Exit):
        without_ca.request("GET", "/api/v1/health")
    monkeypatch.setenv("SLMFLEET_CA_FILE", str(tls_fleet.pki.ca))
    assert ApiClient(tls_fleet.controller.api, "t", tmp_path).request("GET", "/api/v1/health") is not None
    explicit = ApiClient(tls_fleet.controller.api, "t", tmp_path, ca_file=tls_fleet.pki.rogue_ca)
    with pytest.raises(typer.Exit):
        explicit.request("GET", "/api/v1/health")


def test_every_cli_command_takes_ca_file_and_enroll_verifies_https(tls_fleet: TlsFleet, tmp_path: Path) -> None:
    api = tls_fleet.controller.api
    base = ["--api", api, "--token", tls_fleet.controller.token, "--data-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "SLMFLEET_CA_FILE"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(slmfleet_cmd(*args), capture_output=True, text=True, timeout=60, env=env)

    refused = cli("devices", "list", *base)
    assert refused.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr + refused.stdout
    assert cli("--ca-file", str(tls_fleet.pki.ca), "devices", "list", *base).returncode == 0
    created = cli("--ca-file", str(tls_fleet.pki.ca), "enrollment", "create", "--device-id", "tls-dev", *base)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]

    enroll = ["agent", "enroll", "--controller", api, "--token", token, "--dir", str(tmp_path / "etc")]
    unverified = cli(*enroll)
    assert unverified.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in unverified.stderr
    enrolled = cli(*enroll, "--ca-file", str(tls_fleet.pki.ca))
    assert enrolled.returncode == 0, enrolled.stderr
    assert "tls-dev" in (tmp_path / "etc" / "agent.toml").read_text()


def test_slmfleet_up_with_an_embedded_tls_broker(pki: Pki, tmp_path: Path) -> None:
    if mosquitto_binary() is None:
        pytest.skip("no mosquitto binary: the embedded broker serves TLS with mosquitto only")
    http_port = free_port()
    proc = Proc(
        slmfleet_cmd("up", "--data-dir", str(tmp_path / "c"), "--port", str(http_port), "--broker-port", "0"),
        tmp_path / "controller.log",
        env={
            "SLMFLEET_EMBEDDED_BROKER_TLS_CERT_FILE": str(pki.cert),
            "SLMFLEET_EMBEDDED_BROKER_TLS_KEY_FILE": str(pki.key),
            "SLMFLEET_BROKER_CA_FILE": str(pki.ca),
        },
    )
    try:
        api = f"http://127.0.0.1:{http_port}"
        wait_until(
            lambda: proc.alive() and httpx.get(api + "/api/v1/health", timeout=2).json()["broker"]["connected"],
            30,
            what=f"controller connected to its embedded TLS broker (log: {proc.log_path})",
        )
        conf = (tmp_path / "c" / "broker" / "mosquitto.conf").read_text()
        assert f"certfile {pki.cert.resolve()}" in conf and f"keyfile {pki.key.resolve()}" in conf
        assert "MQTT broker   mqtts://127.0.0.1:" in proc.log()
        assert f"--ca-file {pki.ca.resolve()}" in proc.log()
    finally:
        proc.stop(20)


def test_tls_settings_go_in_pairs_and_must_exist(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="tls_cert_file and tls_key_file go together"):
        load_settings(data_dir=tmp_path, tls_cert_file=pki.cert)
    with pytest.raises(SettingsError, match="embedded_broker_tls_cert_file and embedded_broker_tls_key_file"):
        load_settings(data_dir=tmp_path, embedded_broker_tls_key_file=pki.key)
    with pytest.raises(SettingsError, match="broker_ca_file"):
        load_settings(data_dir=tmp_path, broker_ca_file=tmp_path / "missing.pem")
    s = load_settings(data_dir=tmp_path, tls_cert_file=pki.cert, tls_key_file=pki.key)
    assert s.https
    assert not load_settings(data_dir=tmp_path).https


def test_mosquitto_config_without_tls_is_unchanged(tmp_path: Path) -> None:
    plain = mosquitto_config("127.0.0.1", 1884, tmp_path)
    assert "certfile" not in plain and "keyfile" not in plain
    tls = mosquitto_config("127.0.0.1", 1884, tmp_path, tls_cert_file=tmp_path / "c.pem", tls_key_file=tmp_path / "k")
    assert tls.index("listener 1884 127.0.0.1") < tls.index("certfile") < tls.index("persistence true")


def test_mqtt_tls_checks_the_chain_and_the_host_name(pki: Pki) -> None:
    loop = asyncio.new_event_loop()
    try:
        for ca in (str(pki.ca), None):  # a given CA file, or the system's CAs: verified either way
            transport = MqttTransport(MqttConfig(tls=True, ca_file=ca), "tls-check", loop=loop)
            ctx = transport._make_client()._ssl_context
            assert ctx is not None
            assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    finally:
        loop.close()
    assert parse_broker_url("mqtts://broker.example")["tls"] is True
    assert parse_broker_url("mqtts://broker.example")["port"] == 8883


def test_dashboard_cookies_are_secure_when_the_api_is_served_over_https(tls_fleet: TlsFleet) -> None:
    """A probe found the dashboard's cookies without ``Secure`` on an HTTPS controller: a browser would send them
    over plain HTTP too."""
    api, data = tls_fleet.controller.api, tls_fleet.controller.data_dir
    with httpx.Client(base_url=api, verify=tls_fleet.ca_context(), timeout=10) as browser:
        form = browser.get("/login")
        login_cookie = form.headers["set-cookie"]
        assert login_cookie.startswith("slmf_login=") and "secure" in login_cookie.lower().split("; ")
        token = re.search(r'name="login_token" value="([^"]+)"', form.text)
        assert token is not None
        password = (data / "admin-password").read_text().strip()
        r = browser.post(
            "/login",
            data={"username": "admin", "password": password, "login_token": token.group(1), "next": "/"},
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text
        session = next(h for h in r.headers.get_list("set-cookie") if h.startswith("slmf_session="))
        assert {"secure", "httponly", "samesite=lax"} <= {p.strip().lower() for p in session.split(";")}

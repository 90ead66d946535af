"""The agent as a systemd service: the unit passes systemd-analyze, the installer is idempotent and
safe to rehearse, and the agent speaks sd_notify (READY, WATCHDOG, STOPPING) to a real socket."""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.runtime.config import load_settings
from controller.broker.embedded import EmbeddedBroker, free_port
from tests import bundles
from tests.helpers import REPO, Proc, slmfleet_cmd, wait_until

UNIT = REPO / "deploy" / "systemd" / "slmfleet-agent.service"
INSTALLER = REPO / "deploy" / "install-agent.sh"
DEFAULT_BINARY = "/opt/slmfleet/venv/bin/slmfleet"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu package: systemd)")
    return found


def verify(unit_text: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on ``unit_text`` with ExecStart pointed at this checkout's real agent
    (verify insists the binary exists; the unit's own path is checked separately)."""
    binary = Path(sys.executable).parent / "slmfleet"
    assert binary.is_file(), binary
    path = tmp / "slmfleet-agent.service"
    path.write_text(unit_text.replace(DEFAULT_BINARY, str(binary)))
    return subprocess.run([systemd_analyze(), "verify", str(path)], capture_output=True, text=True, timeout=60)


def unit_settings(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    result = verify(text, tmp_path)
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings for verify: there must be none.
    assert "slmfleet-agent.service" not in result.stderr, result.stderr
    unit = unit_settings(text)
    service = unit["Service"]
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "always" and service["KillMode"] == "mixed"
    assert service["ExecStart"] == f"{DEFAULT_BINARY} agent --config /etc/slmfleet/agent.toml"
    credentials = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("LoadCredential=")]
    assert credentials == [
        "mqtt-password:/etc/slmfleet/mqtt-password",
        "signing-key:/etc/slmfleet/signing-key.pem",
        "mqtt-client-cert:/etc/slmfleet/client.pem",
        "mqtt-client-key:/etc/slmfleet/client.key",
    ]
    assert service["StateDirectory"] == "slmfleet-agent"
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
    }.items():
        assert service[key] == value, key
    assert unit["Unit"]["Wants"] == "network-online.target" and "network-online.target" in unit["Unit"]["After"]


def test_a_broken_unit_fails_verification(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad value are reported."""
    broken = UNIT.read_text().replace("WatchdogSec=30", "WatchdogSecs=30").replace("KillMode=mixed", "KillMode=soft")
    result = verify(broken, tmp_path)
    assert "WatchdogSecs" in result.stderr and "kill mode" in result.stderr


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(INSTALLER), *args], capture_output=True, text=True, timeout=60)


def test_the_installer_writes_config_and_unit_under_a_root_dir_idempotently(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = install("--root-dir", str(root), "--no-venv", "--device-id", "pump-7", "--broker", "mqtt://10.1.2.3:1883")
    assert first.returncode == 0, first.stderr
    config = root / "etc/slmfleet/agent.toml"
    password = root / "etc/slmfleet/mqtt-password"
    unit_file = root / "etc/systemd/system/slmfleet-agent.service"
    settings = load_settings(config, {})  # the generated configuration is one the agent accepts
    assert settings.device_id == "pump-7" and settings.broker == "mqtt://10.1.2.3:1883"
    assert str(settings.data_dir) == "/var/lib/slmfleet-agent"  # = StateDirectory
    assert stat.S_IMODE(password.stat().st_mode) == 0o600 and password.read_text() == ""
    assert (root / "etc/slmfleet/signing-key.pem").read_text() == ""  # none pinned yet: LoadCredential needs it
    for credential in ("client.pem", "client.key"):  # no client certificate: empty, but there for LoadCredential
        path = root / "etc/slmfleet" / credential
        assert path.read_text() == "" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert unit_file.read_text() == UNIT.read_text()
    # Root-only actions are printed, never run, under --root-dir.
    assert "useradd" in first.stdout and "(skipped: --root-dir)" in first.stdout
    assert "systemctl enable slmfleet-agent.service (skipped" in first.stdout

    config.write_text(config.read_text() + "http_port = 8089\n")  # an operator's edit
    second = install("--root-dir", str(root), "--no-venv", "--device-id", "other")
    assert second.returncode == 0, second.stderr
    assert "+ write" not in second.stdout  # nothing rewritten
    assert "agent.toml exists; kept" in second.stdout and "service is up to date" in second.stdout
    assert load_settings(config, {}).http_port == 8089 and load_settings(config, {}).device_id == "pump-7"

    moved = install("--root-dir", str(tmp_path / "r2"), "--no-venv", "--prefix", "/srv/fleet", "--user", "edge")
    assert moved.returncode == 0, moved.stderr
    unit = unit_settings((tmp_path / "r2/etc/systemd/system/slmfleet-agent.service").read_text())
    assert unit["Service"]["ExecStart"].startswith("/srv/fleet/venv/bin/slmfleet agent --config")
    assert unit["Service"]["User"] == "edge"
    assert install("--root-dir", str(tmp_path / "r3"), "--device-id", "bad/id").returncode != 0


def test_a_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    result = install("--dry-run", "--root-dir", str(tmp_path / "root"), "--mqtt-password-file", str(secret))
    assert result.returncode == 0, result.stderr
    for step in ("useradd", "-m venv", "pip install", "slmfleet[agent]", "write /etc/slmfleet/agent.toml"):
        assert step in result.stdout, step
    assert "write /etc/slmfleet/mqtt-password (mode 0600)" in result.stdout
    assert "systemctl restart slmfleet-agent.service (skipped: dry run)" in result.stdout
    assert not any((tmp_path / "root").rglob("*"))


class NotifySocket:
    """The AF_UNIX datagram socket systemd gives a Type=notify service, made here."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sd-", dir="/tmp")  # short: AF_UNIX paths max out at 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.received: list[tuple[float, str]] = []

    def poll(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return self.received
            for line in data.decode().splitlines():
                self.received.append((time.monotonic(), line))

    def has(self, line: str) -> bool:
        return any(text == line for _, text in self.poll())

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    s = NotifySocket()
    yield s
    s.close()


def test_the_agent_notifies_ready_once_serving_and_feeds_the_watchdog(
    notify_socket: NotifySocket, tmp_path: Path, broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = bundles.build("classification", tmp_path_factory.getbasetemp() / "agent-bundles")
    port = free_port()
    agent = Proc(
        slmfleet_cmd(
            "agent",
            *("--broker", broker.url, "--device-id", "notify-1", "--data-dir", str(tmp_path / "data")),
            *("--model", str(model), "--http-port", str(port)),
        ),
        tmp_path / "agent.log",
        env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "400000"},
    )
    try:
        wait_until(lambda: notify_socket.has("READY=1"), 60, what=f"READY=1 (log: {agent.log_path})")
        # READY means serving: the model is loaded and the endpoint answers.
        health = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).json()
        assert health["serving"] is True
        status = [text for _, text in notify_socket.poll() if text.startswith("STATUS=")]
        assert any("serving tiny-sentiment v3 (fp32)" in s for s in status)
        ready_at = next(t for t, text in notify_socket.poll() if text == "READY=1")

        def pings() -> list[float]:
            return [t for t, text in notify_socket.poll() if text == "WATCHDOG=1" and t > ready_at]

        wait_until(lambda: len(pings()) >= 4, 10, what="watchdog pings after READY")
        gaps = [b - a for a, b in zip(pings(), pings()[1:], strict=False)]
        assert max(gaps) < 0.4  # within WATCHDOG_USEC, about every half of it
    finally:
        code = agent.stop(20)
    assert code == 0
    assert notify_socket.has("STOPPING=1")


def test_the_installer_pins_the_signing_key_and_the_agent_reads_it_as_a_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from wire.signing import public_key_pem

    pem = tmp_path / "controller.pub.pem"
    pem.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    root = tmp_path / "root"
    assert install("--root-dir", str(root), "--no-venv", "--signing-key-file", str(pem)).returncode == 0
    pinned = root / "etc/slmfleet/signing-key.pem"
    assert pinned.read_text() == pem.read_text() and stat.S_IMODE(pinned.stat().st_mode) == 0o644
    not_a_key = tmp_path / "junk"
    not_a_key.write_text("hello")
    refused = install("--root-dir", str(tmp_path / "r2"), "--no-venv", "--signing-key-file", str(not_a_key))
    assert refused.returncode != 0 and "not a PEM public key" in refused.stderr

    # systemd hands the file over as $CREDENTIALS_DIRECTORY/signing-key; empty means none pinned
    creds = tmp_path / "creds"
    creds.mkdir()
    settings = load_settings(None, {"device_id": "d", "signing_key_file": str(tmp_path / "fallback.pem")})
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    (creds / "signing-key").write_text("")
    assert settings.pinned_key_file() == tmp_path / "fallback.pem"
    shutil.copy(pinned, creds / "signing-key")
    assert settings.pinned_key_file() == creds / "signing-key"

"""The data directory is private: ``slmfleet up`` (with mosquitto, its dynamic security plugin and persistence)
leaves nothing another local user can read, fixes what an older install left open (saying so), and refuses a
directory it cannot make private. A probe found ``controller.db`` 0644 in a 0755 directory."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controller import datadir
from controller.broker import dynsec
from controller.broker.embedded import free_port, mosquitto_binary
from tests.helpers import Proc, slmfleet_cmd, wait_until

NOBODY = 65534
needs_mosquitto = pytest.mark.skipif(
    mosquitto_binary() is None or dynsec.plugin_path() is None, reason="needs mosquitto and its dynamic security plugin"
)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every local user can reach (pytest's own tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="slmfleet-perm-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _modes(root: Path) -> dict[str, int]:
    out = {}
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            out[path.relative_to(root).as_posix() if path != root else "."] = stat.S_IMODE(path.lstat().st_mode)
    return out


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command as another local user (the tests run as root: a mode check alone would prove nothing)."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _up(data: Path, log: Path, *extra: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        slmfleet_cmd("up", "--data-dir", str(data), "--port", str(port), "--broker-port", str(free_port()), *extra),
        log,
    )
    api = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: proc.alive() and httpx.get(api + "/api/v1/health", timeout=2).json()["broker"]["connected"],
        30,
        what=f"controller up (log: {log})",
    )
    return proc, api


@pytest.mark.slow
@needs_mosquitto
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to act as another user")
def test_nothing_in_the_data_directory_is_readable_by_another_local_user(open_dir: Path, tmp_path: Path) -> None:
    (open_dir / "beside.txt").write_text("readable")
    (open_dir / "beside.txt").chmod(0o644)
    assert _as_nobody("cat", str(open_dir / "beside.txt")).returncode == 0  # the other user reaches this far
    data = open_dir / "data"
    proc, api = _up(data, tmp_path / "up.log", "--broker-auth", "dynsec")
    try:
        token = (data / "admin-token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        created = httpx.post(api + "/api/v1/enrollment-tokens", json={"device_id": "d1"}, headers=auth, timeout=10)
        enrolled = httpx.post(api + "/api/v1/enroll", json={"token": created.json()["token"]}, timeout=30)
        assert enrolled.status_code == 200, enrolled.text  # the plugin rewrote its file with a device's hash
        while_running = _modes(data)
    finally:
        assert proc.stop(30) == 0
    after = _modes(data)  # mosquitto saved its persistence on the way out
    for name in ("controller.db-wal", "controller.db-shm"):
        assert while_running[name] == 0o600, name
    for name in ("broker/mosquitto.db", "broker/dynamic-security.json", "broker/controller.secret"):
        assert after[name] == 0o600, name
    for name in ("controller.db", "admin-token", "admin-password", "keys/signing-key.pem", "broker/mosquitto.log"):
        assert after[name] == 0o600, name
    assert after["."] == 0o700 and after["broker"] == 0o700
    open_to_others = {n: f"{m:04o}" for n, m in {**while_running, **after}.items() if m & 0o077}
    assert open_to_others == {"signing-key.pub.pem": "0644"}  # the public key, which devices pin
    # and a real other user cannot read any of it, not even the public key (the directory stops it)
    for name in ("controller.db", "admin-token", "broker/dynamic-security.json", "signing-key.pub.pem"):
        denied = _as_nobody("cat", str(data / name))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, name


@pytest.mark.slow
@needs_mosquitto
def test_an_open_data_directory_from_an_older_install_is_made_private_with_a_log_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, _ = _up(data, tmp_path / "first.log")
    assert proc.stop(30) == 0
    # what the probe found: a world-readable database in a world-readable directory
    for path in [data, *data.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    proc, _ = _up(data, tmp_path / "second.log")
    try:
        modes = _modes(data)
        assert modes["."] == 0o700 and modes["controller.db"] == 0o600 and modes["admin-token"] == 0o600
        assert modes["broker"] == 0o700 and modes["broker/mosquitto.db"] == 0o600
        assert {n for n, m in modes.items() if m & 0o077} == {"signing-key.pub.pem"}
        log = (tmp_path / "second.log").read_text()
        assert "was open to other users: made" in log and "controller.db 0644->0600" in log, log[-2000:]
    finally:
        proc.stop(30)
    # once fixed, nothing more to say
    proc, _ = _up(data, tmp_path / "third.log")
    proc.stop(30)
    assert "open to other users" not in (tmp_path / "third.log").read_text()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to act as another user")
def test_a_directory_it_cannot_make_private_is_refused_with_what_to_do(open_dir: Path) -> None:
    theirs = open_dir / "theirs"
    theirs.mkdir(mode=0o755)  # root's, readable by all: the controller below runs as another user
    ran = _as_nobody(*slmfleet_cmd("up", "--data-dir", str(theirs), "--port", str(free_port())))
    out = ran.stdout + ran.stderr
    assert ran.returncode == 1 and "Traceback" not in out, out
    assert f"the data directory {theirs} belongs to root (uid 0), not to this user" in " ".join(out.split()), out
    assert list(theirs.iterdir()) == []  # nothing written into it


def test_make_private_fixes_modes_and_leaves_links_and_the_public_key(tmp_path: Path) -> None:
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    root.chmod(0o755)
    (root / "sub").chmod(0o775)
    (root / "controller.db").write_text("x")
    (root / "controller.db").chmod(0o644)
    (root / "sub" / "run.sh").write_text("x")
    (root / "sub" / "run.sh").chmod(0o755)
    (root / "signing-key.pub.pem").write_text("pub")
    (root / "signing-key.pub.pem").chmod(0o644)
    outside = tmp_path / "outside"
    outside.write_text("not ours")
    outside.chmod(0o644)
    (root / "link").symlink_to(outside)
    fixed = datadir.make_private(root)
    assert sorted(fixed) == sorted(
        [". 0755->0700", "sub 0775->0700", "controller.db 0644->0600", "sub/run.sh 0755->0700"]
    )
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # a link's target is not ours to change
    assert stat.S_IMODE((root / "signing-key.pub.pem").stat().st_mode) == 0o644
    assert datadir.make_private(root) == []

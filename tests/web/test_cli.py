"""``slmfleet up`` creates the dashboard's first admin; ``slmfleet users`` manages the others."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from controller.broker.embedded import free_port
from tests.helpers import Proc, slmfleet_cmd, wait_until
from tests.web.support import csrf_token, login


def cli(*args: str, data: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        slmfleet_cmd(*args, "--data-dir", str(data)), capture_output=True, text=True, timeout=60, input=stdin
    )


@pytest.mark.slow
def test_up_creates_an_admin_who_adds_users_from_the_command_line(tmp_path: Path) -> None:
    port, broker_port = free_port(), free_port()
    data = tmp_path / "data"
    up = Proc(
        slmfleet_cmd("up", "--data-dir", str(data), "--port", str(port), "--broker-port", str(broker_port)),
        tmp_path / "up.log",
    )
    api = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(api + "/api/v1/health", timeout=2).status_code == 200, 30, what="slmfleet up")
        password_file = data / "admin-password"
        assert stat.S_IMODE(os.stat(password_file).st_mode) == 0o600
        admin_password = password_file.read_text().strip()
        assert len(admin_password) >= 20
        assert f"{api}/" in up.log() and str(password_file) in up.log()
        with httpx.Client(base_url=api, timeout=10) as browser:
            assert login(browser, "admin", admin_password).status_code == 303
            assert "admin" in browser.get("/").text
        # the CLI uses the admin token from the data dir; without a terminal it generates the password
        added = cli("users", "add", "bea", "--role", "viewer", data=data)
        assert added.returncode == 0, added.stderr
        generated = added.stdout.split("password (shown once): ")[1].strip()
        pw_file = tmp_path / "cara.pw"
        pw_file.write_text("cara-has-her-own-password\n")
        made = cli("users", "add", "cara", "--role", "operator", "--password-file", str(pw_file), data=data)
        assert made.returncode == 0, made.stderr
        listed = cli("users", "list", data=data)
        assert listed.returncode == 0 and "bea" in listed.stdout and "operator" in listed.stdout
        refused = cli("users", "add", "bea", "--role", "admin", data=data)
        assert refused.returncode == 1 and "already exists" in refused.stderr
        with httpx.Client(base_url=api, timeout=10) as bea:
            assert login(bea, "bea", generated).status_code == 303
            home = bea.get("/")
            assert home.status_code == 200 and "viewer" in home.text
            assert bea.get("/rollouts/new").status_code == 403
            assert cli("users", "set", "bea", "--role", "operator", data=data).returncode == 0
            assert bea.get("/rollouts/new").status_code == 200  # the role applies to the open session
            assert cli("users", "remove", "bea", data=data).returncode == 0
            assert bea.get("/", follow_redirects=False).status_code in (303, 401)
            assert bea.post("/logout", data={"csrf_token": csrf_token(home.text)}).status_code == 401
        with httpx.Client(base_url=api, timeout=10) as cara:
            assert login(cara, "cara", "cara-has-her-own-password").status_code == 303
    finally:
        assert up.stop(30) == 0, up.log()
    # a second start keeps the admin's password (an operator may have changed it)
    up2 = Proc(
        slmfleet_cmd("up", "--data-dir", str(data), "--port", str(port), "--broker-port", str(broker_port)),
        tmp_path / "up2.log",
    )
    try:
        wait_until(lambda: httpx.get(api + "/api/v1/health", timeout=2).status_code == 200, 30)
        assert (data / "admin-password").read_text().strip() == admin_password
    finally:
        up2.stop(30)

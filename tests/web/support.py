"""Helpers for the dashboard tests: a real HTTP server in a thread, logins, users, the browser's location."""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session

from controller.auth import users
from controller.auth.tokens import Role
from controller.broker.embedded import free_port
from controller.cli.up import KEEP_ALIVE_S
from tests.helpers import REPO, wait_until

PASSWORDS = {"olivia": "olivia-operates-the-fleet", "vera": "vera-only-views-things", "adam": "adam-administers-it"}
ROLES = {"olivia": Role.OPERATOR, "vera": Role.VIEWER, "adam": Role.ADMIN}
ARTIFACTS = REPO / "test-artifacts" / "web"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """Debian's Chromium (or SLMFLEET_CHROMIUM); Playwright never downloads a browser of its own here."""
    configured = os.environ.get("SLMFLEET_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    for candidate in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def add_users(engine: Any, names: tuple[str, ...] = ("olivia", "vera", "adam")) -> None:
    with Session(engine) as session:
        for name in names:
            users.create_user(session, name, ROLES[name], PASSWORDS[name], created_by="tests")
        session.commit()


def login_token(html: str) -> str:
    found = re.search(r'name="login_token" value="([^"]+)"', html)
    assert found, "no login token in the login form"
    return found.group(1)


def csrf_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def login(client: TestClient | httpx.Client, name: str, password: str | None = None) -> Any:
    """Log in through the form; returns the final answer (the cookie jar keeps the session)."""
    form = client.get("/login")
    return client.post(
        "/login",
        data={
            "username": name,
            "password": password or PASSWORDS[name],
            "login_token": login_token(form.text),
            "next": "/",
        },
        follow_redirects=False,
    )


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread (a browser needs a real socket)."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                access_log=False,
                lifespan="on",
                timeout_keep_alive=KEEP_ALIVE_S,  # as `slmfleet up` serves it
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="dashboard-test-server", daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, what="the test HTTP server started")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


#: the screenshots the README shows (``SLMFLEET_SCREENSHOTS=docs/screenshots make test`` refreshes them)
README_SHOTS = frozenset(
    {"fleet", "devices", "device", "models", "rollouts", "rollout", "rollout-paused", "rollout-new"}
)


def save_screenshot(page: Any, name: str, full_page: bool = True) -> Path:
    """test-artifacts/web/NAME.png; the README's ones also in $SLMFLEET_SCREENSHOTS when that is set."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    docs = os.environ.get("SLMFLEET_SCREENSHOTS")
    if docs and name in README_SHOTS:
        target = Path(docs) if Path(docs).is_absolute() else REPO / docs
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / f"{name}.png")
    return path

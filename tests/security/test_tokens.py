"""Operators' API tokens: an admin creates (secret once), lists and revokes them; everyone else is refused."""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import pkgutil
import sqlite3
import textwrap
from collections.abc import Callable
from datetime import timedelta
from types import ModuleType
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlmodel import Session, select
from typer.testing import CliRunner

from controller.auth.tokens import Role
from controller.cli import app as cli_app
from controller.db.models import ApiToken, AuditEntry
from controller.db.types import utcnow
from tests.conftest import LiveController
from tests.security.conftest import LiveServer


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _audit(ctl: LiveController, action: str) -> list[AuditEntry]:
    with Session(ctl.runtime.engine) as session:
        return list(session.exec(select(AuditEntry).where(AuditEntry.action == action)).all())


@pytest.fixture
def api(make_controller: Callable[..., LiveController]) -> LiveController:
    """A controller without a broker whose reads need a token too (so a refused token shows everywhere)."""
    return make_controller(None, require_auth_for_reads=True)


def test_admin_creates_lists_and_revokes_a_token(api: LiveController) -> None:
    c = api.client
    made = c.post("/api/v1/tokens", json={"name": "ci-bot", "role": "operator"}, headers=api.auth)
    assert made.status_code == 201, made.text
    body = made.json()
    secret = body["token"]
    assert secret.startswith("slmf_") and body["prefix"] == secret[:12]
    assert body["role"] == "operator" and body["active"] and body["expires_at"] is None and body["revoked_at"] is None

    # the secret works, and only its SHA-256 is stored
    assert c.get("/api/v1/devices", headers=_bearer(secret)).status_code == 200
    with Session(api.runtime.engine) as session:
        row = session.get(ApiToken, body["id"])
        assert row is not None and row.last_used_at is not None
        assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    db = sqlite3.connect(api.runtime.settings.data_dir / "controller.db")
    try:
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    assert secret not in dump and secret[12:] not in dump

    # the list never carries a secret
    listed = c.get("/api/v1/tokens", headers=api.auth)
    assert listed.status_code == 200
    assert secret not in listed.text and "token_hash" not in listed.text
    mine = next(t for t in listed.json() if t["id"] == body["id"])
    assert mine["name"] == "ci-bot" and mine["last_used_at"] is not None and "token" not in mine

    # revoked: refused at once, kept in the list as revoked
    assert c.delete(f"/api/v1/tokens/{body['id']}", headers=api.auth).status_code == 204
    refused = c.get("/api/v1/devices", headers=_bearer(secret))
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    again = next(t for t in c.get("/api/v1/tokens", headers=api.auth).json() if t["id"] == body["id"])
    assert again["revoked_at"] is not None and not again["active"]
    assert c.delete(f"/api/v1/tokens/{body['id']}", headers=api.auth).status_code == 204  # harmless twice
    assert c.delete("/api/v1/tokens/999999", headers=api.auth).status_code == 404
    assert c.delete(f"/api/v1/tokens/{2**63}", headers=api.auth).status_code == 422

    # who did it is in the audit log
    created = _audit(api, "token.create")
    assert [(e.actor, e.target, e.detail["role"]) for e in created] == [("test-admin", "ci-bot", "operator")]
    assert secret not in str(created[0].detail)
    revoked = _audit(api, "token.revoke")
    assert [(e.actor, e.detail["id"], e.detail["already"]) for e in revoked] == [
        ("test-admin", body["id"], False),
        ("test-admin", body["id"], True),
    ]


def test_only_admins_manage_tokens(api: LiveController) -> None:
    c = api.client
    victim = c.post("/api/v1/tokens", json={"name": "victim", "role": "viewer"}, headers=api.auth).json()
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/api/v1/tokens", None),
        ("POST", "/api/v1/tokens", {"name": "sneaky", "role": "admin"}),
        ("DELETE", f"/api/v1/tokens/{victim['id']}", None),
    ]
    for role in (Role.OPERATOR, Role.VIEWER):
        token = api.token_for(role, f"a-{role.value}")
        for method, path, body in calls:
            r = c.request(method, path, json=body, headers=_bearer(token))
            assert r.status_code == 403, (role, method, path, r.text)
    for headers in ({}, _bearer("slmf_not-a-token"), {"Authorization": "Basic YWRtaW46YWRtaW4="}):
        for method, path, body in calls:
            r = c.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (headers, method, path, r.text)
    with Session(api.runtime.engine) as session:
        names = {t.name for t in session.exec(select(ApiToken)).all()}
        row = session.get(ApiToken, victim["id"])
        assert row is not None and row.revoked_at is None
    assert "sneaky" not in names
    assert _audit(api, "token.revoke") == []


def test_expired_tokens_are_refused_at_once(api: LiveController) -> None:
    c = api.client
    made = c.post(
        "/api/v1/tokens", json={"name": "short", "role": "admin", "expires_in_days": 1}, headers=api.auth
    ).json()
    assert made["expires_at"] is not None
    assert c.get("/api/v1/tokens", headers=_bearer(made["token"])).status_code == 200
    with Session(api.runtime.engine) as session:  # let a day pass for this token
        row = session.get(ApiToken, made["id"])
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
        session.add(row)
        session.commit()
    r = c.get("/api/v1/tokens", headers=_bearer(made["token"]))
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    listed = next(t for t in c.get("/api/v1/tokens", headers=api.auth).json() if t["id"] == made["id"])
    assert not listed["active"] and listed["revoked_at"] is None
    for bad in ({"name": "x", "role": "admin", "expires_in_days": 0}, {"name": "x", "role": "root"}, {"name": ""}):
        assert c.post("/api/v1/tokens", json=bad, headers=api.auth).status_code == 422, bad


def test_cli_creates_lists_and_revokes(live_server: Callable[..., LiveServer]) -> None:
    live = live_server(None)
    runner = CliRunner()
    common = ["--api", live.url, "--token", live.admin_token]

    made = runner.invoke(
        cli_app, ["tokens", "create", "nightly", "--role", "viewer", "--expires-in-days", "30", *common]
    )
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip().splitlines()[-1]
    assert secret.startswith("slmf_")
    assert httpx.get(f"{live.url}/api/v1/devices", headers=_bearer(secret), timeout=10).status_code == 200

    listed = runner.invoke(cli_app, ["tokens", "list", *common])
    assert listed.exit_code == 0, listed.output
    assert "nightly" in listed.stdout and "viewer" in listed.stdout and secret not in listed.stdout
    token_id = next(
        t["id"]
        for t in httpx.get(f"{live.url}/api/v1/tokens", headers=_bearer(live.admin_token), timeout=30.0).json()
        if t["name"] == "nightly"
    )

    revoked = runner.invoke(cli_app, ["tokens", "revoke", str(token_id), *common])
    assert revoked.exit_code == 0, revoked.output
    assert httpx.get(f"{live.url}/api/v1/tokens", headers=_bearer(secret), timeout=10).status_code == 401
    assert "nightly" not in runner.invoke(cli_app, ["tokens", "list", *common]).stdout
    assert "nightly" in runner.invoke(cli_app, ["tokens", "list", "--all", *common]).stdout

    # a viewer cannot use the CLI to make tokens: a one-line error, exit code 1
    viewer = live.token(Role.VIEWER, "v")
    denied = runner.invoke(cli_app, ["tokens", "create", "x", "--role", "admin", "--api", live.url, "--token", viewer])
    assert denied.exit_code == 1 and "403" in denied.output


# ------------------------------------------------------------------- audit --


def _calls_audit(func: Callable[..., Any], module: ModuleType, depth: int = 2) -> bool:
    """True when ``func`` calls ``audit.record``, directly or through a helper of its module."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "record" and getattr(f.value, "id", "") == "audit":
                return True
            if isinstance(f, ast.Name):
                names.add(f.id)
    if depth == 0:
        return False
    for name in names:
        helper = getattr(module, name, None)
        if (
            inspect.isfunction(helper)
            and helper.__module__ == module.__name__
            and _calls_audit(helper, module, depth - 1)
        ):
            return True
    return False


def test_every_write_route_records_who_made_it() -> None:
    """Each POST/PUT/PATCH/DELETE of the REST API writes an audit entry (checked in its source)."""
    import controller.api.routes as routes_pkg

    writes: list[tuple[APIRoute, ModuleType]] = []
    for info in pkgutil.iter_modules(routes_pkg.__path__):
        module = importlib.import_module(f"{routes_pkg.__name__}.{info.name}")
        router = getattr(module, "router", None)
        for r in getattr(router, "routes", []):
            if isinstance(r, APIRoute) and (r.methods or set()) & {"POST", "PUT", "PATCH", "DELETE"}:
                writes.append((r, module))
    assert len(writes) >= 15
    assert {"/api/v1/tokens", "/api/v1/tokens/{token_id}"} <= {r.path for r, _ in writes}
    missing = [f"{sorted(r.methods or ())} {r.path}" for r, module in writes if not _calls_audit(r.endpoint, module)]
    assert missing == [], f"write routes without an audit entry: {missing}"

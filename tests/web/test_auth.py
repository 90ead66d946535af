"""Dashboard access: logins, sessions, roles, CSRF tokens and the audit log (through the ASGI app)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from controller.auth import passwords
from controller.auth.tokens import Role
from controller.db.models import AuditEntry, WebSession, WebUser
from controller.web import sessions
from tests.conftest import LiveController
from tests.web.support import PASSWORDS, add_users, csrf_token, login, login_token

HTML = {"Accept": "text/html"}


def audit_actions(ctl: LiveController) -> list[tuple[str, str, str]]:
    with Session(ctl.runtime.engine) as session:
        rows = session.exec(select(AuditEntry).order_by(col(AuditEntry.id))).all()
    return [(r.actor, r.action, r.target) for r in rows]


def test_pages_need_a_login(web: LiveController) -> None:
    c = web.client
    r = c.get("/rollouts?show=active", headers=HTML, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Frollouts%3Fshow%3Dactive"
    assert c.get("/rollouts/x/live", headers={"X-Slmf-Fragment": "1"}).status_code == 401
    assert c.get("/devices/d/series.json").status_code == 401
    assert c.post("/rollouts/x/pause", data={"csrf_token": "x"}).status_code == 401
    # the REST API is untouched: bearer tokens, no cookies
    assert c.get("/api/v1/devices").status_code == 200


def test_a_login_gives_a_hardened_cookie_and_logout_ends_the_session(web: LiveController) -> None:
    c = web.client
    r = login(c, "olivia")
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(sessions.COOKIE + "="))
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=lax", "path=/"} <= flags
    assert "secure" not in flags  # plain HTTP here; see test_secure_cookies_when_asked
    secret = cookie.split(";")[0].split("=", 1)[1]
    with Session(web.runtime.engine) as session:
        stored = session.exec(select(WebSession)).all()
    assert len(stored) == 1 and stored[0].id != secret and len(stored[0].id) == 64  # only its hash is kept
    home = c.get("/")
    assert home.status_code == 200 and "olivia" in home.text and "operator" in home.text
    out = c.post("/logout", data={"csrf_token": csrf_token(home.text)}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    # the old cookie is worthless now, even if someone kept a copy
    replay = TestClient(web.client.app, cookies={sessions.COOKIE: secret})
    assert replay.get("/", headers=HTML, follow_redirects=False).status_code == 303
    actions = [(a, b) for a, b, _ in audit_actions(web)]
    assert ("olivia", "dashboard.login") in actions and ("olivia", "dashboard.logout") in actions


def test_secure_cookies_when_asked(make_controller: Callable[..., LiveController]) -> None:
    ctl = make_controller(None, dashboard_secure_cookie=True)
    add_users(ctl.runtime.engine, ("vera",))
    # a Secure cookie never comes back over plain HTTP: behind a TLS proxy the browser speaks HTTPS
    assert login(ctl.client, "vera").status_code == 403
    tls = TestClient(ctl.client.app, base_url="https://testserver")
    assert "secure" in tls.get("/login").headers["set-cookie"].lower()
    r = login(tls, "vera")
    assert r.status_code == 303
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(sessions.COOKIE + "="))
    assert "secure" in cookie.lower()
    assert tls.get("/").status_code == 200


def test_cookies_are_secure_whenever_tls_is_on_even_if_told_otherwise(
    make_controller: Callable[..., LiveController],
) -> None:
    """Behind a TLS proxy (an https public_url) the request reaches the controller as plain HTTP: still Secure."""
    ctl = make_controller(None, public_url="https://fleet.example.com", dashboard_secure_cookie=False)
    add_users(ctl.runtime.engine, ("vera",))
    assert "secure" in ctl.client.get("/login").headers["set-cookie"].lower()
    plain = make_controller(None)
    assert "secure" not in plain.client.get("/login").headers["set-cookie"].lower()  # plain HTTP on loopback


def test_wrong_passwords_are_refused_alike_and_guessing_is_slowed(web: LiveController) -> None:
    c = web.client
    wrong = login(c, "olivia", "not-her-password")
    unknown = login(c, "nobody", "not-her-password")
    assert wrong.status_code == unknown.status_code == 401
    assert "Wrong user name or password." in wrong.text and "Wrong user name or password." in unknown.text
    for _ in range(4):
        assert login(c, "vera", "guess-guess-guess").status_code == 401
    blocked = login(c, "vera")  # the right password, but this address must wait after its guesses
    assert blocked.status_code == 429 and "Too many failed attempts from your address" in blocked.text
    assert 1 <= int(blocked.headers["Retry-After"]) <= 2
    assert login(c, "olivia").status_code == 303  # other names are not affected
    # vera herself, from an address that did not guess, logs in at once: nobody can lock her out
    elsewhere = TestClient(web.client.app, client=("192.0.2.7", 40000))
    assert login(elsewhere, "vera").status_code == 303


def test_the_login_form_has_its_own_csrf_token(web: LiveController, browserless_client: Any) -> None:
    c = web.client
    form = c.get("/login")
    token = login_token(form.text)
    other = browserless_client()  # a page on another site cannot read our cookie, so cannot match the token
    r = other.post(
        "/login",
        data={"username": "olivia", "password": PASSWORDS["olivia"], "login_token": token},
        follow_redirects=False,
    )
    assert r.status_code == 403 and "form expired" in r.text
    r = c.post(
        "/login",
        data={"username": "olivia", "password": PASSWORDS["olivia"], "login_token": "forged"},
        follow_redirects=False,
    )
    assert r.status_code == 403


def test_next_only_leads_to_this_site(web: LiveController) -> None:
    c = web.client
    for target, expected in (
        ("//evil.example/x", "/"),
        ("https://evil.example", "/"),
        ("/devices?q=a", "/devices?q=a"),
        ("/\\evil.example", "/"),
    ):
        form = c.get("/login")
        r = c.post(
            "/login",
            data={
                "username": "olivia",
                "password": PASSWORDS["olivia"],
                "login_token": login_token(form.text),
                "next": target,
            },
            follow_redirects=False,
        )
        assert r.headers["location"] == expected, target


def test_every_write_needs_this_sessions_csrf_token(web: LiveController, browserless_client: Any) -> None:
    first, second = web.client, browserless_client()
    assert login(first, "olivia").status_code == 303
    assert login(second, "adam").status_code == 303
    mine = csrf_token(first.get("/").text)
    theirs = csrf_token(second.get("/").text)
    assert mine != theirs
    for path in ("/rollouts/0123abcd/pause", "/rollouts/0123abcd/abort", "/rollouts"):
        missing = first.post(path, data={})
        assert missing.status_code == 403 and "security token" in missing.text
        forged = first.post(path, data={"csrf_token": theirs})
        assert forged.status_code == 403 and "security token" in forged.text
    # with its own token the same request passes the check and reaches the rollout engine
    r = first.post("/rollouts/0123abcd/pause", data={"csrf_token": mine})
    assert r.status_code == 404 and "not found" in r.text
    assert first.post("/logout", data={"csrf_token": theirs}).status_code == 403


def test_viewers_see_no_actions_and_their_writes_are_refused(web: LiveController, seeded: dict[str, Any]) -> None:
    rollout = seeded["big_rollout"]  # paused: resume, advance and abort apply
    viewer = web.client
    assert login(viewer, "vera").status_code == 303
    page = viewer.get(f"/rollouts/{rollout}")
    assert page.status_code == 200
    assert 'class="actions' not in page.text and "data-action=" not in page.text
    assert "New rollout" not in viewer.get("/rollouts").text
    assert viewer.get("/rollouts/new").status_code == 403
    token = csrf_token(page.text)  # the viewer's own, valid token: the role still forbids the write
    refused = viewer.post(f"/rollouts/{rollout}/resume", data={"csrf_token": token})
    assert refused.status_code == 403 and "operator role" in refused.text
    with Session(web.runtime.engine) as session:
        from controller.db.models import Rollout

        assert session.get(Rollout, rollout).state == "paused"  # type: ignore[union-attr]
    assert not [a for a in audit_actions(web) if a[0] == "vera" and a[1].startswith("rollout.")]
    # an operator sees the actions the state allows, and only those
    operator = TestClient(web.client.app)
    assert login(operator, "olivia").status_code == 303
    html = operator.get(f"/rollouts/{rollout}").text
    assert 'class="actions' in html
    for action, shown in (("resume", True), ("abort", True), ("advance", True), ("pause", False), ("approve", False)):
        tag = html.split(f'data-action="{action}"', 1)[1].split(">", 1)[0]
        assert ("hidden" not in tag) == shown, action


def test_users_are_managed_by_admins_and_changes_end_sessions(web: LiveController) -> None:
    c, admin = web.client, web.auth
    viewer_token = web.token_for(Role.VIEWER, "a-viewer-token")
    assert c.get("/api/v1/users", headers={"Authorization": f"Bearer {viewer_token}"}).status_code == 403
    assert c.post("/api/v1/users", json={"name": "x", "role": "viewer"}).status_code == 401
    made = c.post("/api/v1/users", json={"name": "otto", "role": "operator"}, headers=admin)
    assert made.status_code == 201, made.text
    generated = made.json()["generated_password"]
    assert generated and len(generated) >= 20
    assert (
        c.post(
            "/api/v1/users", json={"name": "otto", "role": "viewer", "password": "long-enough-pw"}, headers=admin
        ).status_code
        == 409
    )
    assert (
        c.post(
            "/api/v1/users", json={"name": "short", "role": "viewer", "password": "short"}, headers=admin
        ).status_code
        == 422
    )
    with Session(web.runtime.engine) as session:
        stored = session.exec(select(WebUser).where(WebUser.name == "otto")).one()
    assert stored.password_hash.startswith("scrypt$") and generated not in stored.password_hash
    assert passwords.verify_password(generated, stored.password_hash)
    assert login(c, "otto", generated).status_code == 303
    assert c.get("/", headers=HTML, follow_redirects=False).status_code == 200
    # a new password ends every session of the user
    r = c.patch("/api/v1/users/otto", json={"password": "a-brand-new-password"}, headers=admin)
    assert r.status_code == 200
    assert c.get("/", headers=HTML, follow_redirects=False).status_code == 303
    assert login(c, "otto", generated).status_code == 401
    assert login(c, "otto", "a-brand-new-password").status_code == 303
    # a role change applies to the open session at once; a removal ends it
    c.patch("/api/v1/users/otto", json={"role": "viewer"}, headers=admin)
    assert c.get("/rollouts/new").status_code == 403
    assert c.delete("/api/v1/users/otto", headers=admin).status_code == 204
    assert c.get("/", headers=HTML, follow_redirects=False).status_code == 303
    listed = [u["name"] for u in c.get("/api/v1/users", headers=admin).json()]
    assert "otto" not in listed and {"olivia", "vera", "adam"} <= set(listed)
    trail = [(a, b) for a, b, t in audit_actions(web) if t == "otto"]
    assert trail[:1] == [("test-admin", "user.create")]
    assert ("test-admin", "user.update") in trail and ("test-admin", "user.delete") in trail


def test_pages_carry_security_headers(web: LiveController) -> None:
    login(web.client, "vera")
    r = web.client.get("/")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in r.text and " style=" not in r.text  # nothing inline for the CSP to block

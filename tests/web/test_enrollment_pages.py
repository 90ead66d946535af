"""Enrollment and revocation in the dashboard (admins only).

Through the ASGI app: who may reach the pages and forms, CSRF, field errors. In a real browser (headless
Chromium via Playwright, against a controller served on 127.0.0.1): a token created on the page enrolls a
device over HTTP, a token revoked on the page no longer does, and a device revoked from its page is revoked
for the REST API too, with an audit entry naming the admin.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from controller.app import create_app
from controller.auth.tokens import Role, create_token
from controller.broker.dynsec import DynsecError
from controller.db.models import AuditEntry, Device, EnrollmentToken
from controller.enrollment import tokens
from controller.runtime import ControllerRuntime
from tests.conftest import LiveController, controller_settings
from tests.web.support import (
    CHROMIUM_FLAGS,
    PASSWORDS,
    LiveServer,
    add_users,
    chromium_path,
    csrf_token,
    login,
    save_screenshot,
)

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the dev extra's playwright is missing: the browser tests skip
    expect = sync_playwright = None

CHROMIUM = chromium_path()
#: the browser tests (also marked slow) skip, with the reason, where Chromium or playwright is missing
in_browser = pytest.mark.skipif(
    CHROMIUM is None or sync_playwright is None,
    reason="needs Debian's Chromium (/usr/bin/chromium or SLMFLEET_CHROMIUM) and the dev extra's playwright",
)
TIMEOUT_MS = 30_000
HTML = {"Accept": "text/html"}


# ------------------------------------------------------------------ helpers --


def token_rows(engine: Any) -> list[EnrollmentToken]:
    with Session(engine) as session:
        return list(session.exec(select(EnrollmentToken).order_by(col(EnrollmentToken.id))).all())


def audit_trail(engine: Any, action: str) -> list[AuditEntry]:
    with Session(engine) as session:
        return list(session.exec(select(AuditEntry).where(AuditEntry.action == action).order_by(col(AuditEntry.id))))


def api_token(ctl: LiveController, **body: object) -> dict[str, Any]:
    r = ctl.client.post("/api/v1/enrollment-tokens", json=body, headers=ctl.auth)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def add_device(engine: Any, device_id: str) -> None:
    with Session(engine) as session:
        session.add(Device(id=device_id, labels={"site": "berlin"}))
        session.commit()


def logged_in(make: Callable[[], TestClient], name: str) -> tuple[TestClient, str]:
    """A client with ``name``'s session and that session's CSRF token."""
    client = make()
    assert login(client, name).status_code == 303
    return client, csrf_token(client.get("/").text)


# ------------------------------------------------------- through the app --


def test_only_admins_reach_enrollment_and_device_revocation(
    web: LiveController, browserless_client: Callable[[], TestClient]
) -> None:
    token = api_token(web, note="for pump-7")
    add_device(web.runtime.engine, "pump-7")
    admin, _ = logged_in(browserless_client, "adam")
    listing = admin.get("/enrollment")
    assert listing.status_code == 200 and 'href="/enrollment"' in listing.text
    assert f'data-prefix="{token["prefix"]}"' in listing.text and "for pump-7" in listing.text
    assert 'data-testid="revoke-device"' in admin.get("/devices/pump-7").text
    for name, role in (("olivia", "operator"), ("vera", "viewer")):
        client, csrf = logged_in(browserless_client, name)
        assert 'href="/enrollment"' not in client.get("/").text  # no nav entry
        assert 'data-testid="revoke-device"' not in client.get("/devices/pump-7").text  # no button
        page = client.get("/enrollment", headers=HTML)
        assert page.status_code == 403 and f"this needs the admin role; {name} is a {role}" in page.text
        # their own valid CSRF token does not make the writes allowed
        posts = [
            ("/enrollment", {"csrf_token": csrf, "labels": "site=berlin", "expires_in_hours": "1"}),
            (f"/enrollment/{token['id']}/revoke", {"csrf_token": csrf}),
            ("/devices/pump-7/revoke", {"csrf_token": csrf, "reason": "lost"}),
        ]
        for path, form in posts:
            r = client.post(path, data=form, follow_redirects=False)
            assert r.status_code == 403 and "admin role" in r.text, (name, path, r.status_code)
    anonymous = browserless_client()
    assert anonymous.post("/enrollment", data={"csrf_token": "x"}).status_code == 401
    assert anonymous.get("/enrollment", headers=HTML, follow_redirects=False).headers["location"].startswith("/login")
    # nothing changed
    assert [(r.id, tokens.unusable_reason(r)) for r in token_rows(web.runtime.engine)] == [(token["id"], None)]
    assert web.client.get("/api/v1/devices/pump-7").json()["revoked_at"] is None
    assert audit_trail(web.runtime.engine, "device.revoke") == []


def test_posts_without_the_sessions_csrf_token_are_refused(
    web: LiveController, browserless_client: Callable[[], TestClient]
) -> None:
    token = api_token(web)
    add_device(web.runtime.engine, "pump-8")
    admin, csrf = logged_in(browserless_client, "adam")
    _, someone_elses = logged_in(browserless_client, "adam")  # the same user's other session
    for submitted in ({}, {"csrf_token": ""}, {"csrf_token": "guessed"}, {"csrf_token": someone_elses}):
        for path, form in (
            ("/enrollment", {"labels": "site=berlin", "expires_in_hours": "1"}),
            (f"/enrollment/{token['id']}/revoke", {}),
            ("/devices/pump-8/revoke", {"reason": "lost"}),
        ):
            r = admin.post(path, data={**form, **submitted}, follow_redirects=False)
            assert r.status_code == 403 and "security token" in r.text, (path, submitted, r.status_code)
    assert [r.id for r in token_rows(web.runtime.engine)] == [token["id"]]  # no token created
    assert tokens.unusable_reason(token_rows(web.runtime.engine)[0]) is None  # nor revoked
    assert web.client.get("/api/v1/devices/pump-8").json()["revoked_at"] is None
    # the same post with the session's token goes through
    r = admin.post(f"/enrollment/{token['id']}/revoke", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/enrollment?done=revoked"
    assert tokens.unusable_reason(token_rows(web.runtime.engine)[0]) == "the enrollment token was revoked"


@pytest.mark.parametrize(
    ("form", "field", "message"),
    [
        ({"labels": "site berlin"}, "labels", "'site berlin' is not key=value"),
        ({"labels": "site=berlin, site=oslo"}, "labels", "label 'site' is given twice"),
        ({"labels": "bad key=x"}, "labels", "label 'bad key': the key may hold"),
        ({"labels": "site=not ok"}, "labels", "label 'site': the value may hold"),
        ({"device_id": "bad/id"}, "device_id", "a device id has 1-128 characters"),
        ({"device_id": "x" * 129}, "device_id", "a device id has 1-128 characters"),
        ({"expires_in_hours": "0"}, "expires_in_hours", "above 0 and at most 8760"),
        ({"expires_in_hours": "8761"}, "expires_in_hours", "above 0 and at most 8760"),
        ({"expires_in_hours": "-1"}, "expires_in_hours", "above 0 and at most 8760"),
        ({"expires_in_hours": "nan"}, "expires_in_hours", "above 0 and at most 8760"),
        ({"expires_in_hours": "inf"}, "expires_in_hours", "above 0 and at most 8760"),
        ({"expires_in_hours": "soon"}, "expires_in_hours", "above 0 and at most 8760"),
        ({"note": "n" * 257}, "note", "at most 256 characters"),
    ],
)
def test_bad_input_re_renders_the_form_with_the_fields_error(
    web: LiveController, browserless_client: Callable[[], TestClient], form: dict[str, str], field: str, message: str
) -> None:
    admin, csrf = logged_in(browserless_client, "adam")
    body = {"labels": "", "device_id": "", "expires_in_hours": "24", "note": "", **form, "csrf_token": csrf}
    r = admin.post("/enrollment", data=body)
    assert r.status_code == 422
    marked = re.search(rf'<label class="invalid">[^<]*\s*<input name="{field}"[^>]*>.*?</label>', r.text, flags=re.S)
    assert marked is not None, f"{field} is not marked"
    assert message in marked.group(0).replace("&#39;", "'")
    assert "The token was not created" in r.text and 'data-testid="created-token"' not in r.text
    assert token_rows(web.runtime.engine) == []


def test_every_bad_field_is_marked_at_once_and_the_typed_values_stay(
    web: LiveController, browserless_client: Callable[[], TestClient]
) -> None:
    admin, csrf = logged_in(browserless_client, "adam")
    body = {"labels": "x y", "device_id": "a/b", "expires_in_hours": "0", "note": "kept", "csrf_token": csrf}
    r = admin.post("/enrollment", data=body)
    assert r.status_code == 422
    assert r.text.count('<label class="invalid">') == 3
    for name, value in (("labels", "x y"), ("device_id", "a/b"), ("expires_in_hours", "0"), ("note", "kept")):
        assert f'name="{name}" value="{value}"' in r.text
    assert token_rows(web.runtime.engine) == []


def test_revoking_a_device_needs_a_reason_and_works_without_javascript(
    web: LiveController, browserless_client: Callable[[], TestClient]
) -> None:
    add_device(web.runtime.engine, "pump-9")
    admin, csrf = logged_in(browserless_client, "adam")
    r = admin.post("/devices/pump-9/revoke", data={"csrf_token": csrf, "reason": "  "})
    assert r.status_code == 422 and "Give a reason for revoking" in r.text
    assert web.client.get("/api/v1/devices/pump-9").json()["revoked_at"] is None
    assert admin.post("/devices/nope/revoke", data={"csrf_token": csrf, "reason": "x"}).status_code == 404
    # a plain form post (what a browser without JavaScript sends) revokes it
    r = admin.post("/devices/pump-9/revoke", data={"csrf_token": csrf, "reason": "stolen"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/devices/pump-9?done=revoked-none"
    assert web.client.get("/api/v1/devices/pump-9").json()["revoked_at"] is not None
    assert "pump-9" in web.runtime.enrollment.revoked
    page = admin.get(r.headers["location"]).text
    assert "Device revoked" in page and 'data-testid="device-revoked"' in page
    assert 'data-testid="revoke-device"' not in page  # nothing left to press
    [entry] = audit_trail(web.runtime.engine, "device.revoke")
    assert (entry.actor, entry.target) == ("adam", "pump-9")
    assert entry.detail["reason"] == "stolen" and entry.detail["via"] == "dashboard" and not entry.detail["already"]
    # how it comes back: the page leads to the enrollment form with the id filled in
    assert 'data-testid="restore-link"' in page and 'href="/enrollment?device_id=pump-9"' in page
    form = admin.get("/enrollment?device_id=pump-9").text
    assert 'name="device_id" value="pump-9"' in form
    r = admin.post("/enrollment", data={"csrf_token": csrf, "device_id": "pump-9", "expires_in_hours": "1"})
    assert r.status_code == 201
    [row] = token_rows(web.runtime.engine)
    assert row.device_id == "pump-9" and row.created_at > entry.at  # the kind of token that brings it back


class RecordingDynsec:
    """Stands in for the broker's dynamic-security admin: records the deletions, or refuses them."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.removed: list[str] = []

    def remove_device(self, device_id: str) -> None:
        if self.refuse:
            raise DynsecError("timed out waiting for the broker")
        self.removed.append(device_id)


def test_with_dynsec_revoking_deletes_the_devices_broker_credentials(
    web: LiveController, browserless_client: Callable[[], TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same service call as the REST route: the broker client goes; a broker that does not confirm is said."""
    for device_id in ("pump-10", "pump-11"):
        add_device(web.runtime.engine, device_id)
    admin, csrf = logged_in(browserless_client, "adam")
    broker = RecordingDynsec()
    monkeypatch.setattr(web.runtime.enrollment, "admin", broker)
    r = admin.post("/devices/pump-10/revoke", data={"csrf_token": csrf, "reason": "stolen"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/devices/pump-10?done=revoked"
    assert broker.removed == ["pump-10"]
    assert "its broker credentials are deleted" in admin.get(r.headers["location"]).text
    monkeypatch.setattr(web.runtime.enrollment, "admin", RecordingDynsec(refuse=True))
    r = admin.post("/devices/pump-11/revoke", data={"csrf_token": csrf, "reason": "stolen"}, follow_redirects=False)
    assert r.status_code == 503 and "repeat the revocation" in r.text
    assert 'data-testid="revoke-device"' in r.text and "Repeat the revocation" in r.text  # offered once more
    # marked in the controller all the same; repeating it once the broker answers deletes the credentials
    assert web.client.get("/api/v1/devices/pump-11").json()["revoked_at"] is not None
    monkeypatch.setattr(web.runtime.enrollment, "admin", broker)
    r = admin.post("/devices/pump-11/revoke", data={"csrf_token": csrf, "reason": "again"}, follow_redirects=False)
    assert r.status_code == 303 and broker.removed == ["pump-10", "pump-11"]
    assert [e.detail["already"] for e in audit_trail(web.runtime.engine, "device.revoke")] == [False, False, True]


# ---------------------------------------------------------- in a browser --


@dataclass
class Site:
    url: str
    runtime: ControllerRuntime
    api: httpx.Client

    def enroll(self, secret: str, device_id: str | None = None) -> httpx.Response:
        body = {"token": secret} if device_id is None else {"token": secret, "device_id": device_id}
        return httpx.post(f"{self.url}/api/v1/enroll", json=body, timeout=30)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A controller served over HTTP, without a broker of its own: enrollment hands out a configured URL."""
    root = tmp_path_factory.mktemp("enrollment-pages")
    settings = controller_settings(root / "controller", None, device_broker_url="mqtt://127.0.0.1:1")
    runtime = ControllerRuntime(settings)
    server = LiveServer(create_app(settings, runtime)).start()
    try:
        add_users(runtime.engine)
        with Session(runtime.engine) as session:
            admin_token, _ = create_token(session, "enrollment-tests", Role.ADMIN)
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30) as api:
            yield Site(server.url, runtime, api)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert sync_playwright is not None
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


class Tab:
    """A logged-in browser tab that records console errors (CSP violations among them) and page errors."""

    def __init__(self, browser: Any, site: Site, name: str, javascript: bool = True) -> None:
        self.context = browser.new_context(base_url=site.url, java_script_enabled=javascript)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        #: statuses the test provokes on purpose (a 422 document makes Chromium log "Failed to load resource")
        self.expected_statuses: set[int] = set()
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", self._console)
        #: the form posts the tab sent (a cancelled confirmation or a failed validation sends none)
        self.posts: list[str] = []
        self.page.on("request", lambda r: self.posts.append(r.url) if r.method == "POST" else None)
        page = self.page
        page.goto("/login")
        page.fill("input[name=username]", name)
        page.fill("input[name=password]", PASSWORDS[name])
        page.get_by_role("button", name="Log in").click()
        assert expect is not None
        expect(page.get_by_test_id("whoami")).to_contain_text(name)

    def _console(self, message: Any) -> None:
        provoked = any(f"status of {s} " in message.text for s in self.expected_statuses)
        if message.type == "error" and not provoked:
            self.problems.append(f"console: {message.text}")


@pytest.fixture
def tab(browser: Any, site: Site) -> Iterator[Callable[..., Tab]]:
    made: list[Tab] = []

    def open_as(name: str, javascript: bool = True) -> Tab:
        made.append(Tab(browser, site, name, javascript))
        return made[-1]

    yield open_as
    for t in made:
        t.context.close()


def create_on_page(page: Any, labels: str = "", device_id: str = "", note: str = "", hours: str = "") -> Any:
    page.goto("/enrollment")
    page.fill("input[name=labels]", labels)
    page.fill("input[name=device_id]", device_id)
    page.fill("input[name=note]", note)
    if hours:
        page.fill("input[name=expires_in_hours]", hours)
    with page.expect_navigation() as navigation:
        page.get_by_test_id("create-token").click()
    return navigation.value


def token_row(page: Any, prefix: str) -> Any:
    return page.locator(f"[data-testid=token-table] tbody tr[data-prefix='{prefix}']")


@pytest.mark.slow
@in_browser
def test_an_admin_creates_a_token_sees_it_once_and_it_enrolls_a_device(tab: Callable[..., Tab], site: Site) -> None:
    assert expect is not None
    t = tab("adam")
    page = t.page
    expect(page.get_by_role("link", name="Enrollment")).to_be_visible()
    answer = create_on_page(page, labels="site=berlin, tier=canary", note="line 3 pump")
    assert answer is not None and answer.status == 201
    secret = page.get_by_test_id("enrollment-secret").input_value()
    assert re.fullmatch(r"slmfe_[A-Za-z0-9_-]{43}", secret), secret
    expect(page.get_by_test_id("enroll-command")).to_have_text(
        f"slmfleet agent enroll --controller {site.url} --token {secret}"
    )
    expect(page.get_by_test_id("shown-once")).to_contain_text("it is not shown again")
    prefix = secret[:12]
    row = token_row(page, prefix)
    expect(row).to_contain_text("line 3 pump")
    expect(row).to_contain_text("site=berlin")
    expect(row.get_by_test_id("token-state")).to_have_text("yes")
    # the secret is gone from the next page, and from the database (only its hash is there)
    page.goto("/enrollment")
    expect(token_row(page, prefix)).to_have_count(1)
    assert secret not in page.content()
    expect(page.get_by_test_id("created-token")).to_have_count(0)
    [stored] = [r for r in token_rows(site.runtime.engine) if r.prefix == prefix]
    assert secret not in str(stored.model_dump()) and stored.token_hash == tokens.hash_token(secret)
    # the token enrolls a device over HTTP, once
    enrolled = site.enroll(secret)
    assert enrolled.status_code == 200, enrolled.text
    device_id = enrolled.json()["device_id"]
    assert enrolled.json()["labels"] == {"site": "berlin", "tier": "canary"}
    assert site.api.get(f"/api/v1/devices/{device_id}").json()["enrolled_at"] is not None
    again = site.enroll(secret)
    assert again.status_code == 403 and "already used" in again.json()["detail"]
    # and the list says so
    page.reload()
    row = token_row(page, prefix)
    expect(row).to_have_attribute("data-state", "used")
    expect(row.get_by_test_id("token-state")).to_have_text("no: used")
    expect(row.get_by_test_id("used")).to_contain_text(device_id)
    expect(row.get_by_role("button", name="Revoke")).to_have_count(0)
    save_screenshot(page, "enrollment")  # after the secret was used up: no live secret in the artifact
    [created] = [e for e in audit_trail(site.runtime.engine, "enrollment_token.create") if e.target == prefix]
    assert created.actor == "adam" and created.detail["via"] == "dashboard"
    assert created.detail["labels"] == {"site": "berlin", "tier": "canary"}
    assert t.problems == []


@pytest.mark.slow
@in_browser
def test_a_token_revoked_on_the_page_no_longer_enrolls(tab: Callable[..., Tab], site: Site) -> None:
    assert expect is not None
    t = tab("adam")
    page = t.page
    create_on_page(page, device_id="pump-bound", note="to be revoked", hours="2")
    secret = page.get_by_test_id("enrollment-secret").input_value()
    prefix = secret[:12]
    row = token_row(page, prefix)
    expect(row).to_contain_text("pump-bound")
    t.posts.clear()
    page.once("dialog", lambda dialog: dialog.dismiss())  # thought better of it: nothing is sent
    row.get_by_role("button", name="Revoke").click()
    assert t.posts == []
    expect(row).to_have_attribute("data-state", "usable")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    expect(page).to_have_url(re.compile(r"/enrollment\?done=revoked$"))
    expect(page.locator(".notice")).to_contain_text("Enrollment token revoked")
    row = token_row(page, prefix)
    expect(row).to_have_attribute("data-state", "revoked")
    expect(row.get_by_test_id("token-state")).to_have_text("no: revoked")
    expect(row.get_by_role("button", name="Revoke")).to_have_count(0)
    refused = site.enroll(secret)
    assert refused.status_code == 403 and "revoked" in refused.json()["detail"]
    assert site.api.get("/api/v1/devices/pump-bound").status_code == 404
    [entry] = [e for e in audit_trail(site.runtime.engine, "enrollment_token.revoke") if e.target == prefix]
    assert entry.actor == "adam" and entry.detail["via"] == "dashboard"
    assert t.problems == []


@pytest.mark.slow
@in_browser
def test_bad_labels_in_the_browser_answer_422_with_the_message(tab: Callable[..., Tab], site: Site) -> None:
    assert expect is not None
    t = tab("adam")
    t.expected_statuses.add(422)
    before = len(token_rows(site.runtime.engine))
    answer = create_on_page(t.page, labels="site=berlin, tier canary", note="typo")
    assert answer is not None and answer.status == 422
    label = t.page.locator("label.invalid", has=t.page.locator("input[name=labels]"))
    expect(label.locator(".field-error")).to_have_text(
        "'tier canary' is not key=value: write labels as key=value, key=value"
    )
    expect(t.page.locator("input[name=labels]")).to_have_value("site=berlin, tier canary")  # kept to fix
    expect(t.page.get_by_test_id("created-token")).to_have_count(0)
    assert len(token_rows(site.runtime.engine)) == before
    assert t.problems == []


@pytest.mark.slow
@in_browser
@pytest.mark.parametrize("javascript", [True, False], ids=["with-js", "without-js"])
def test_an_admin_revokes_a_device_from_its_page(tab: Callable[..., Tab], site: Site, javascript: bool) -> None:
    assert expect is not None
    device_id = f"edge-{'js' if javascript else 'nojs'}"
    secret = site.api.post("/api/v1/enrollment-tokens", json={"device_id": device_id}).json()["token"]
    assert site.enroll(secret).status_code == 200
    t = tab("adam", javascript=javascript)
    page = t.page
    page.goto(f"/devices/{device_id}")
    form = page.get_by_test_id("revoke-device")
    button = form.get_by_role("button", name="Revoke device")
    t.posts.clear()
    button.click()  # no reason yet: the browser's own validation holds the form back, with or without JS
    assert t.posts == []
    assert site.api.get(f"/api/v1/devices/{device_id}").json()["revoked_at"] is None
    form.locator("input[name=reason]").fill("left the site, not coming back")
    if javascript:
        page.once("dialog", lambda dialog: dialog.accept())
    button.click()
    expect(page).to_have_url(re.compile(rf"/devices/{device_id}\?done=revoked-none$"))
    expect(page.locator(".notice")).to_contain_text("Device revoked")
    expect(page.locator("h1 .badge")).to_have_text("revoked")
    expect(page.get_by_test_id("device-revoked")).to_be_visible()
    expect(page.get_by_test_id("revoke-device")).to_have_count(0)
    assert site.api.get(f"/api/v1/devices/{device_id}").json()["revoked_at"] is not None
    assert device_id in site.runtime.enrollment.revoked
    [entry] = [e for e in audit_trail(site.runtime.engine, "device.revoke") if e.target == device_id]
    assert entry.actor == "adam" and entry.detail["reason"] == "left the site, not coming back"
    assert entry.detail["via"] == "dashboard"
    expect(page.locator("section", has_text="Changes by operators")).to_contain_text("device.revoke")
    save_screenshot(page, f"device-revoked-{'js' if javascript else 'nojs'}")
    assert t.problems == []

"""The dashboard in a real browser: headless Chromium (Debian's) driven by Playwright, against a controller
served on 127.0.0.1 with a real broker and protocol peers that download, switch and report telemetry.

Screenshots go to test-artifacts/web/ (and to docs/screenshots/ when SLMFLEET_SCREENSHOTS=docs/screenshots).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, col, select

from benchmarks.dashboard import seed
from controller.app import create_app
from controller.auth.tokens import Role, create_token
from controller.broker.embedded import EmbeddedBroker
from controller.db.models import AuditEntry, Rollout
from controller.health.series import version_series
from controller.runtime import ControllerRuntime
from tests.conftest import BROKER_ENGINE, controller_settings
from tests.helpers import wait_until
from tests.notify.receiver import Receiver
from tests.notify.test_webhooks import verified
from tests.registry.tiny_models import anomaly_model
from tests.rollouts.autopeer import AutoPeer
from tests.web.support import CHROMIUM_FLAGS, PASSWORDS, LiveServer, add_users, chromium_path, save_screenshot
from wire.messages import InstalledModel

CHROMIUM = chromium_path()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium at /usr/bin/chromium: install Debian's package"
        " (apt-get install chromium; `make setup-test` does it as root) or set SLMFLEET_CHROMIUM",
    ),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="the dev extra's playwright package is missing")
expect = playwright_api.expect
TIMEOUT_MS = 60_000


@dataclass
class Site:
    url: str
    runtime: ControllerRuntime
    api: httpx.Client
    peers: dict[str, list[AutoPeer]]
    seeded: dict[str, Any]
    created: dict[str, str] = field(default_factory=dict)

    def audit(self, target: str) -> list[tuple[str, str, dict[str, Any]]]:
        with Session(self.runtime.engine) as session:
            rows = session.exec(select(AuditEntry).where(AuditEntry.target == target).order_by(col(AuditEntry.id)))
            return [(r.actor, r.action, r.detail) for r in rows]

    def state(self, rollout_id: str) -> str:
        with Session(self.runtime.engine) as session:
            row = session.get(Rollout, rollout_id)
            return row.state if row else ""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A controller on a private broker, served over HTTP, with two model versions, a seeded fleet for context
    and two groups of three peers (group=a, group=b) serving version 1."""
    root = tmp_path_factory.mktemp("dashboard")
    broker = EmbeddedBroker(root / "broker", engine=BROKER_ENGINE)  # type: ignore[arg-type]
    broker.start()
    settings = controller_settings(
        root / "controller",
        broker,
        chunk_size=65536,
        rollout_step_s=0.2,
        health_interval_s=0.5,
        webhook_retry_base_s=0.3,
    )
    runtime = ControllerRuntime(settings)
    server = LiveServer(create_app(settings, runtime)).start()
    peers: list[AutoPeer] = []
    try:
        bridge = runtime.bridge
        assert bridge is not None
        wait_until(lambda: bridge.connected, 15, what="controller connected to the broker")
        with Session(runtime.engine) as session:
            token, _ = create_token(session, "browser-tests", Role.ADMIN)
        api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        path, threshold = anomaly_model(root / "m.onnx")
        options = {
            "task": "anomaly",
            "description": "pump vibration anomaly score",
            "anomaly": {"threshold": threshold, "higher_is_anomalous": False, "output": "scores"},
        }
        versions = []
        for _ in range(2):
            r = api.post(
                "/api/v1/models/pump/versions",
                files=[("file", ("m.onnx", path.read_bytes()))],
                data={"options": json.dumps(options)},
            )
            assert r.status_code == 201, r.text
            versions.append(r.json())
        add_users(runtime.engine)
        seeded = seed(runtime.engine, devices=240, telemetry_per_device=2, chart_points=180, rollouts=6)
        key = api.get("/api/v1/signing-key").json()["public_key_pem"]
        v1 = versions[0]["variants"][0]
        serving = InstalledModel(model="pump", version=1, variant="fp32", artifact=v1["artifact_id"])
        groups: dict[str, list[AutoPeer]] = {}
        for group, site_label in (("a", "berlin"), ("b", "oslo")):
            groups[group] = [
                AutoPeer(
                    broker.port,
                    f"pump-{group}{i}",
                    key,
                    serving=serving,
                    labels={"group": group, "site": site_label, "fleet": "test-pumps"},
                )
                for i in range(3)
            ]
            peers.extend(groups[group])
        # the gates compare with what the devices did on version 1 before the rollout
        wait_until(
            lambda: all(len(api.get(f"/api/v1/devices/{p.device_id}/telemetry").json()) >= 4 for p in peers),
            30,
            what="baseline telemetry from every peer",
        )
        yield Site(server.url, runtime, api, groups, seeded)
    finally:
        for p in peers:
            p.close()
        server.stop()
        broker.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        # Debian's Chromium; launch() gives every run a fresh, empty profile directory
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


class Watched:
    """A logged-in browser tab that records console errors, page errors and failed or refused requests."""

    def __init__(self, browser: Any, site: Site, name: str | None) -> None:
        self.context = browser.new_context(base_url=site.url, viewport={"width": 1360, "height": 900})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.allowed: set[str] = set()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", self._failed)
        self.page.on("response", self._response)
        if name is not None:
            self.login(name)

    def _failed(self, request: Any) -> None:
        # ERR_ABORTED: the tab moved on before a late request (the favicon, a poll) finished; nothing failed
        if request.failure != "net::ERR_ABORTED":
            self.problems.append(f"request failed: {request.url} {request.failure}")

    def _console(self, message: Any) -> None:
        expected = message.text.startswith("Failed to load resource") and message.location.get("url") in self.allowed
        if message.type == "error" and not expected:
            self.problems.append(f"console: {message.text} ({message.location.get('url')})")

    def _response(self, response: Any) -> None:
        if response.status >= 400 and response.url not in self.allowed:
            self.problems.append(f"{response.status}: {response.url}")

    def login(self, name: str) -> None:
        page = self.page
        page.goto("/login")
        page.fill("input[name=username]", name)
        page.fill("input[name=password]", PASSWORDS[name])
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_test_id("whoami")).to_contain_text(name)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Any, site: Site) -> Iterator[Any]:
    made: list[Watched] = []

    def open_as(name: str | None) -> Watched:
        w = Watched(browser, site, name)
        made.append(w)
        return w

    yield open_as
    for w in made:
        w.close()


def fill_rollout_form(page: Any, selector: str, *, approval: bool = False, description: str = "") -> None:
    page.goto("/rollouts/new")
    page.select_option("select[name=ref]", "pump@2")
    page.fill("input[name=selector]", selector)
    page.fill("input[name=waves]", "1, 100%")
    page.fill("input[name=bake_s]", "0.6")
    page.fill("input[name=failure_threshold]", "1")
    page.fill("input[name=device_timeout_s]", "60")
    page.fill("input[name=deadline_s]", "20")
    page.fill("input[name=warmup_s]", "0")  # the peers serve at full speed from their first inference
    page.fill("input[name=description]", description)
    if approval:
        page.check("input[name=require_approval]")


def test_every_page_loads_without_errors(tab: Any, site: Site) -> None:
    w = tab("olivia")
    page = w.page
    peer = site.peers["a"][0].device_id
    big = site.seeded["big_rollout"]
    checks = [
        ("fleet", "/", lambda: expect(page.get_by_test_id("devices-total")).to_have_text("246")),
        ("devices", "/devices", lambda: expect(page.locator("[data-testid=device-table] tbody tr")).to_have_count(50)),
        (
            "devices-filtered",
            "/devices?selector=group%3Da",
            lambda: expect(page.locator("[data-testid=device-table] tbody tr")).to_have_count(3),
        ),
        (
            "device-peer",
            f"/devices/{peer}",
            lambda: expect(page.get_by_test_id("device-model")).to_contain_text("pump"),
        ),
        ("device", "/devices/dev-00000", lambda: expect(page.locator("[data-chart=latency] canvas")).to_be_visible()),
        ("models", "/models", lambda: expect(page.get_by_test_id("model-pump")).to_contain_text("v2")),
        (
            "rollouts",
            "/rollouts",
            lambda: expect(page.locator("[data-testid=rollout-table] tbody tr")).to_have_count(6),
        ),
        (
            "rollout-seeded",
            f"/rollouts/{big}",
            lambda: expect(page.get_by_test_id("live")).to_have_attribute("data-updated", re.compile(".+")),
        ),
        ("rollout-new", "/rollouts/new", lambda: expect(page.get_by_test_id("create-rollout")).to_be_visible()),
        ("logout-page", "/logout", lambda: expect(page.get_by_role("button", name="Log out").last).to_be_visible()),
    ]
    for name, path, check in checks:
        response = page.goto(path)
        assert response is not None and response.status == 200, (path, response and response.status)
        check()
        if path.startswith("/devices/"):  # the charts drew the device's telemetry
            for chart in ("latency", "throughput"):
                box = page.locator(f"[data-chart={chart}]")
                expect(box.locator("canvas")).to_be_visible()
                expect(box).to_have_attribute("data-points", re.compile(r"^[1-9]\d*$"))
        save_screenshot(page, name, full_page=name != "devices")  # 50 rows: the first screenful says enough
        assert w.problems == [], (path, w.problems)
    anonymous = tab(None)
    response = anonymous.page.goto("/login")
    assert response is not None and response.status == 200
    expect(anonymous.page.get_by_role("button", name="Log in")).to_be_visible()
    save_screenshot(anonymous.page, "login")
    anonymous.page.goto("/devices")  # not logged in: sent to the form, and back after logging in
    expect(anonymous.page).to_have_url(re.compile(r"/login\?next=%2Fdevices$"))
    anonymous.page.fill("input[name=username]", "vera")
    anonymous.page.fill("input[name=password]", PASSWORDS["vera"])
    anonymous.page.get_by_role("button", name="Log in").click()
    expect(anonymous.page).to_have_url(re.compile(r"/devices$"))
    assert anonymous.problems == []


def test_a_rollout_created_from_the_form_progresses_live_to_completion(tab: Any, site: Site) -> None:
    w = tab("olivia")
    page = w.page
    group = site.peers["a"]
    for p in group:
        p.hold("download")  # the canary stays downloading until released: the page must show that first
    fill_rollout_form(page, "group=a", description="pump v2 to group a, from the browser")
    expect(page.get_by_test_id("matching")).to_have_text("3 devices match now.")  # counted as one types
    page.fill("input[name=selector]", "group=a=b")
    expect(page.get_by_test_id("matching")).to_contain_text("selector term")
    page.fill("input[name=selector]", "group=a")
    expect(page.get_by_test_id("matching")).to_have_text("3 devices match now.")
    page.get_by_test_id("create-rollout").click()
    expect(page).to_have_url(re.compile(r"/rollouts/[0-9a-f]{32}\?done=created$"))
    rollout_id = page.url.split("/rollouts/")[1].split("?")[0]
    site.created["a"] = rollout_id
    expect(page.locator(".notice")).to_have_text("Rollout created.")
    live = page.get_by_test_id("live")
    state = live.get_by_test_id("rollout-state")
    progress = live.get_by_test_id("rollout-progress")
    expect(state).to_have_text("deploying")
    expect(progress).to_contain_text("0 of 3 devices on the new version")
    save_screenshot(page, "rollout-deploying")
    for p in group:
        p.release("download")
    # no reload from here on: the page follows the rollout by polling its live fragment
    expect(state).to_have_text("completed", timeout=90_000)
    expect(progress).to_contain_text("3 of 3 devices on the new version (100%)")
    error_rate = live.locator("tr[data-gate=error_rate]")
    expect(error_rate).to_contain_text("pass")
    expect(error_rate.get_by_test_id("gate-value")).to_have_text("0")
    expect(error_rate).to_contain_text("<= 0.01")
    # 0 errors in enough inferences: the bounds at 95% are 0 and under the threshold
    expect(error_rate.get_by_test_id("gate-interval")).to_contain_text("@ 95%")
    expect(live.get_by_test_id("rollout-succeeded")).to_have_text("3 succeeded")
    expect(live.get_by_test_id("transitions")).to_contain_text("gating → completed")
    expect(live.locator("[data-testid=waves] tbody tr")).to_have_count(2)
    expect(live.locator("[data-final]")).to_have_count(1)  # polling has stopped
    expect(page.get_by_test_id("actions").locator("button[data-action]:visible")).to_have_count(0)
    assert all(p.serving is not None and p.serving.version == 2 for p in group)
    assert site.state(rollout_id) == "completed"
    created = [(actor, action) for actor, action, _ in site.audit(rollout_id)]
    assert created == [("olivia", "rollout.create")]
    page.goto(f"/devices/{group[0].device_id}")
    expect(page.get_by_test_id("telemetry-model")).to_contain_text("pump v2")  # what it reports serving now
    history = page.locator("section", has_text="Deployment history")
    expect(history.locator("tbody tr").first).to_contain_text(rollout_id[:8])
    expect(history.locator("tbody tr").first).to_contain_text("active")
    page.goto(f"/rollouts/{rollout_id}")
    save_screenshot(page, "rollout")
    assert w.problems == []


def test_an_operator_pauses_resumes_approves_and_aborts_from_the_page(tab: Any, site: Site) -> None:
    w = tab("olivia")
    page = w.page
    group = site.peers["b"]
    fill_rollout_form(page, "group=b", approval=True, description="pump v2 to group b, one approval per wave")
    page.get_by_test_id("create-rollout").click()
    expect(page).to_have_url(re.compile(r"/rollouts/[0-9a-f]{32}\?done=created$"))
    rollout_id = page.url.split("/rollouts/")[1].split("?")[0]
    state = page.get_by_test_id("live").get_by_test_id("rollout-state")
    actions = page.get_by_test_id("actions")

    def button(action: str) -> Any:
        return actions.locator(f"button[data-action={action}]")

    expect(state).to_have_text("awaiting approval")
    expect(button("approve")).to_be_visible()  # shown by the live update, without a reload
    expect(button("resume")).to_be_hidden()
    page.fill("input[name=reason]", "checking the canary by hand")
    button("pause").click()
    expect(page.locator(".notice")).to_have_text("Paused.")
    expect(state).to_have_text("paused")
    expect(button("resume")).to_be_visible()
    expect(button("pause")).to_be_hidden()
    expect(button("approve")).to_be_hidden()
    save_screenshot(page, "rollout-paused")
    assert site.state(rollout_id) == "paused"
    button("resume").click()
    expect(state).to_have_text("awaiting approval")
    for p in group:
        p.hold("download")  # the second wave stays in flight, so that there is something to abort
    button("approve").click()
    expect(page.locator(".notice")).to_have_text("Approved: the next wave starts.")
    expect(state).to_have_text("deploying")
    page.once("dialog", lambda dialog: dialog.accept())
    button("abort").click()
    expect(page.locator(".notice")).to_contain_text("Aborting")
    for p in group:
        p.release("download")
    expect(state).to_have_text("aborted", timeout=TIMEOUT_MS)
    wait_until(
        lambda: all(p.serving is not None and p.serving.version == 1 for p in group),
        30,
        what="every device of group b back on version 1",
    )
    trail = site.audit(rollout_id)
    assert [(a, b) for a, b, _ in trail] == [
        ("olivia", "rollout.create"),
        ("olivia", "rollout.pause"),
        ("olivia", "rollout.resume"),
        ("olivia", "rollout.approve"),
        ("olivia", "rollout.abort"),
    ]
    assert trail[1][2]["reason"] == "checking the canary by hand"
    operator_actions = page.locator("section", has_text="Operator actions")
    expect(operator_actions).to_contain_text("rollout.abort")
    expect(operator_actions).to_contain_text("checking the canary by hand")
    expect(page.get_by_test_id("transitions")).to_contain_text("olivia")
    assert w.problems == []


def test_a_viewer_finds_no_action_and_forged_posts_are_refused(tab: Any, site: Site) -> None:
    big = site.seeded["big_rollout"]  # paused: an operator could resume, advance or abort it
    viewer = tab("vera")
    page = viewer.page
    page.goto(f"/rollouts/{big}")
    expect(page.get_by_test_id("live")).to_contain_text("paused")
    expect(page.locator("form.actions")).to_have_count(0)
    expect(page.locator("button[data-action]")).to_have_count(0)
    save_screenshot(page, "rollout-viewer")
    page.goto("/rollouts")
    expect(page.get_by_test_id("new-rollout")).to_have_count(0)
    page.goto("/models")
    expect(page.get_by_role("link", name="roll out…")).to_have_count(0)
    viewer.allowed.add(f"{site.url}/rollouts/new")
    response = page.goto("/rollouts/new")
    assert response is not None and response.status == 403
    expect(page.locator(".error")).to_contain_text("operator role")
    # the viewer's own valid token does not make a write allowed
    token = page.locator("input[name=csrf_token]").first.input_value()
    forged = page.request.post(f"/rollouts/{big}/resume", form={"csrf_token": token})
    assert forged.status == 403 and "operator role" in forged.text()
    # another site makes an operator's browser post a form to the dashboard: the cookie (SameSite=Lax)
    # stays home and the token is unknown, so the request is refused
    operator = tab("olivia")
    evil = operator.page
    evil.goto("about:blank")
    evil.set_content(
        f'<form method="post" action="{site.url}/rollouts/{big}/resume">'
        '<input name="csrf_token" value="guessed"><input name="reason" value="forged"></form>'
    )
    operator.allowed.add(f"{site.url}/rollouts/{big}/resume")
    with evil.expect_navigation() as navigation:
        evil.evaluate("document.forms[0].submit()")
    assert navigation.value is not None and navigation.value.status in (401, 403)
    assert site.state(big) == "paused"
    assert not [a for a in site.audit(big) if a[0] in ("vera", "olivia")]
    assert viewer.problems == [] and operator.problems == []


def test_logging_out_ends_the_session(tab: Any, site: Site) -> None:
    w = tab("vera")
    page = w.page
    page.goto("/devices")
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto("/rollouts")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Frollouts$"))
    assert not [c for c in w.context.cookies() if c["name"] == "slmf_session"]
    assert w.problems == []


def test_the_operator_pages_load_without_errors(tab: Any, site: Site) -> None:
    w = tab("olivia")
    page = w.page
    big = site.seeded["big_rollout"]
    for name, path, check in (
        ("deployments", "/deployments", lambda: expect(page.get_by_test_id("deployment-table")).to_be_visible()),
        ("health", "/health", lambda: expect(page.locator("tr[data-version='pump@1']")).to_be_visible()),
        ("fleet-attention", "/", lambda: expect(page.get_by_test_id("attention-rollouts")).to_contain_text(big[:8])),
    ):
        response = page.goto(path)
        assert response is not None and response.status == 200, path
        check()
        save_screenshot(page, name)
        assert w.problems == [], (path, w.problems)
    # the paused rollout on the fleet page leads to it
    page.get_by_test_id("attention-rollouts").get_by_role("link", name=big[:8]).click()
    expect(page).to_have_url(re.compile(f"/rollouts/{big}$"))
    assert w.problems == []


def test_health_charts_draw_what_the_devices_report(tab: Any, site: Site) -> None:
    # the peers report every 0.3 s and the health job sums it every 0.5 s: wait for the first sums
    def summed() -> bool:
        with site.runtime.engine.connect() as conn:
            return version_series(conn, "pump", 1, 3600)["summary"]["reports"] > 0

    wait_until(summed, 20, what="health buckets of pump v1")
    w = tab("vera")
    page = w.page
    page.goto("/health/pump/1?range=1h")
    for chart in ("rate", "latency", "errors"):
        box = page.get_by_test_id(f"chart-{chart}")
        expect(box.locator("canvas")).to_be_visible()
        expect(box).to_have_attribute("data-points", re.compile(r"^[1-9]\d*$"))
    expect(page.get_by_test_id("health-p50")).to_contain_text("ms")
    save_screenshot(page, "health-version")
    assert w.problems == [], w.problems


def test_a_version_uploaded_and_deployed_from_the_browser(tab: Any, site: Site, tmp_path: Path) -> None:
    w = tab("olivia")
    page = w.page
    page.goto("/models")
    page.get_by_test_id("upload-version").click()
    expect(page).to_have_url(re.compile("/models/upload$"))
    model, _ = anomaly_model(tmp_path / "pump-v3.onnx", seed=3)
    page.fill("input[name=model]", "pump")
    page.select_option("select[name=task]", "anomaly")
    page.fill("input[name=description]", "v3 from the browser")
    page.check("input[name=variant_fp32]")
    options = {"anomaly": {"threshold": 0.0, "higher_is_anomalous": False, "output": "scores"}}
    page.fill("textarea[name=options]", json.dumps(options))
    page.get_by_test_id("upload-file").set_input_files(str(model))
    save_screenshot(page, "model-upload")
    page.get_by_test_id("upload").click()
    expect(page).to_have_url(re.compile(r"/imports/[0-9a-f]{32}$"))
    expect(page.get_by_test_id("import-done")).to_contain_text("pump v3 is registered", timeout=120_000)
    page.get_by_test_id("deploy-version").click()
    expect(page).to_have_url(re.compile(r"/deployments/new\?ref=pump%403$"))
    page.fill("input[name=selector]", "group=a")
    expect(page.get_by_test_id("matching")).to_have_text("3 devices match now.")
    for p in site.peers["a"]:
        p.hold("download")  # the page must show them downloading before they finish
    page.get_by_test_id("create-deployment").click()
    expect(page).to_have_url(re.compile(r"/deployments/[0-9a-f]{32}\?done=created$"))
    progress = page.get_by_test_id("deployment-progress")
    expect(progress).to_contain_text("0 of 3 devices active")
    save_screenshot(page, "deployment-running")
    for p in site.peers["a"]:
        p.release("download")
    expect(progress).to_contain_text("3 of 3 devices active (100%)", timeout=TIMEOUT_MS)  # no reload: it polls
    expect(page.locator("[data-testid=targets] tbody tr[data-state=active]")).to_have_count(3)
    expect(page.get_by_test_id("live").locator("[data-final]")).to_have_count(1)
    save_screenshot(page, "deployment")
    assert all(p.serving is not None and p.serving.version == 3 for p in site.peers["a"])
    deployment_id = page.url.split("/deployments/")[1].split("?")[0]
    assert [(a, b) for a, b, _ in site.audit(deployment_id)] == [("olivia", "deployment.create")]
    page.goto("/")
    page.get_by_test_id("audit-deployment").first.click()
    expect(page).to_have_url(re.compile(f"/deployments/{deployment_id}$"))
    assert w.problems == [], w.problems


def test_webhooks_from_the_notifications_page(tab: Any, site: Site) -> None:
    receiver = Receiver(script=[503]).start()
    try:
        w = tab("adam")
        page = w.page
        page.goto("/webhooks")
        page.fill("input[name=name]", "ops-pager")
        page.fill("input[name=url]", receiver.url)
        page.check("input[name='event_rollout.aborting']")
        page.get_by_test_id("add-webhook").click()
        secret = page.get_by_test_id("webhook-secret").input_value()
        assert secret.startswith("whsec_")
        save_screenshot(page, "webhooks")
        page.get_by_role("link", name="ops-pager").first.click()
        page.get_by_role("button", name="Send a test event").click()
        expect(page.locator(".notice")).to_contain_text("A ping event is on its way")
        got = wait_until(lambda: [r for r in receiver.requests("ping") if r.status == 200], 30, what="the ping")
        verified(secret, got[0])
        page.reload()
        expect(page.locator("[data-testid=delivery-log] tr[data-status=delivered]")).to_have_count(1)
        save_screenshot(page, "webhook")
        assert w.problems == [], w.problems
    finally:
        receiver.stop()


def test_screenshots_are_kept_as_artifacts() -> None:
    """The tests above leave their screenshots for the CI run's artifacts (and the README's, on request)."""
    from tests.web.support import ARTIFACTS

    names = {p.stem for p in Path(ARTIFACTS).glob("*.png")}
    assert {"fleet", "devices", "device", "models", "rollout", "rollout-new", "rollout-paused"} <= names

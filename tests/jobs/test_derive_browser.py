"""Derive jobs on the dashboard, in a real browser (headless Chromium driven by Playwright): an operator starts a
distillation from the model page's form, follows it live to the end and finds the lineage on the model page,
then starts a long one and cancels it from the job page."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session

from controller.app import create_app
from controller.auth.tokens import Role, create_token
from controller.runtime import ControllerRuntime
from tests.conftest import controller_settings
from tests.jobs.support import STUDENT, checkpoint_tar, import_options, teacher_checkpoint, texts_file
from tests.web.support import CHROMIUM_FLAGS, PASSWORDS, LiveServer, add_users, chromium_path, save_screenshot

CHROMIUM = chromium_path()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium, or set SLMFLEET_CHROMIUM)"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="the dev extra's playwright package is missing")
pytest.importorskip("torch")
expect = playwright_api.expect


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[str, ControllerRuntime]]:
    runtime = ControllerRuntime(controller_settings(tmp_path / "controller", None))
    server = LiveServer(create_app(runtime.settings, runtime)).start()
    try:
        add_users(runtime.engine)
        with Session(runtime.engine) as session:
            token, _ = create_token(session, "setup", Role.ADMIN)
        r = httpx.post(
            f"{server.url}/api/v1/models/tiny/versions",
            files=[("file", ("teacher.tar", checkpoint_tar(teacher_checkpoint(tmp_path))))],
            data={"options": import_options()},
            headers={"Authorization": f"Bearer {token}"},
            params={"wait": 300},
            timeout=330,
        )
        assert r.status_code == 201, r.text
        yield server.url, runtime
    finally:
        server.stop()


@pytest.fixture
def page(site: tuple[str, ControllerRuntime]) -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        context = browser.new_context(base_url=site[0], viewport={"width": 1360, "height": 900})
        context.set_default_timeout(60_000)
        tab = context.new_page()
        tab.on("dialog", lambda dialog: dialog.accept())  # the cancel button asks for confirmation
        tab.goto("/login")
        tab.fill("input[name=username]", "olivia")
        tab.fill("input[name=password]", PASSWORDS["olivia"])
        tab.get_by_role("button", name="Log in").click()
        expect(tab.get_by_test_id("whoami")).to_contain_text("olivia")
        yield tab
        browser.close()


def start_distill(page: Any, data: Path, epochs: int) -> None:
    page.goto("/models")
    page.get_by_test_id("derive-tiny-1").click()
    form = page.get_by_test_id("derive-form")
    form.locator("select[name=kind]").select_option("distill")
    form.locator("input[name=student]").fill(STUDENT)
    form.locator("input[name=epochs]").fill(str(epochs))
    form.locator("input[name=data]").set_input_files(str(data))
    page.get_by_test_id("derive-submit").click()
    expect(page).to_have_url(re.compile(r"/jobs/[0-9a-f]{32}$"))


def test_an_operator_distills_from_the_model_page_and_cancels_a_job(page: Any, tmp_path: Path) -> None:
    data = texts_file(tmp_path / "texts.jsonl")
    start_distill(page, data, 2)
    expect(page.get_by_test_id("job-done")).to_contain_text("tiny@2", timeout=240_000)
    expect(page.get_by_test_id("job-report")).to_contain_text("cosine_mean")
    save_screenshot(page, "derive-job")
    page.goto("/models")
    lineage = page.get_by_test_id("lineage-tiny-2")
    expect(lineage).to_contain_text("distill of tiny@1")
    expect(lineage).to_contain_text("layers")

    start_distill(page, data, 400)
    expect(page.get_by_test_id("job-message")).to_contain_text("epoch", timeout=120_000)
    page.get_by_test_id("job-actions").get_by_role("button", name="Cancel").click()
    expect(page.get_by_test_id("job-cancelled")).to_contain_text("made no version", timeout=60_000)
    page.goto("/jobs")
    expect(page.get_by_test_id("jobs")).to_contain_text("cancelled")
    expect(page.get_by_test_id("jobs")).to_contain_text("succeeded")

"""Dashboard pages on the server: content, filters in SQL, a fixed number of queries, assets in the package."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from benchmarks.dashboard import count_statements, seed
from controller.db.models import Device, table
from controller.devices import selectors
from controller.web import queries
from tests.conftest import LiveController
from tests.helpers import REPO
from tests.web.support import add_users, login


def rows(html: str, testid: str) -> list[str]:
    body = html.split(f'data-testid="{testid}"', 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return re.findall(r"<tr[ >].*?</tr>", body, flags=re.S)


def device_ids(html: str) -> list[str]:
    return re.findall(r'<a href="/devices/([^"]+)"><code>', html.split('data-testid="device-table"', 1)[1])


def all_labels(ctl: LiveController) -> dict[str, dict[str, str]]:
    with ctl.runtime.engine.connect() as conn:
        return {r.id: r.labels for r in conn.execute(select(table(Device).c.id, table(Device).c.labels))}


def test_every_page_renders_what_the_database_holds(web: LiveController, seeded: dict[str, Any]) -> None:
    c = web.client
    assert login(c, "olivia").status_code == 303
    home = c.get("/")
    assert home.status_code == 200
    assert '<span class="big" data-testid="devices-total">120</span>' in home.text
    assert "site" in home.text and "pump-anomaly v2 (int8)" in home.text
    models = c.get("/models").text
    for name in ("intent-classifier", "pump-anomaly", "helpdesk-gen"):
        assert f'data-testid="model-{name}"' in models
    assert "int4-weight-only" in models and "top1" in models and "MiB" in models
    listing = c.get("/rollouts")
    assert len(rows(listing.text, "rollout-table")) == 4
    big = c.get(f"/rollouts/{seeded['big_rollout']}")
    assert big.status_code == 200 and "paused" in big.text and "checking the canary" in big.text
    assert len(rows(big.text, "waves")) == 4 and len(rows(big.text, "gates")) == 3
    live = c.get(f"/rollouts/{seeded['big_rollout']}/live")
    assert live.status_code == 200 and 'data-actions="resume,advance,abort"' in live.text
    device = c.get("/devices/dev-00000")
    assert device.status_code == 200 and 'data-series="/devices/dev-00000/series.json"' in device.text
    series = c.get("/devices/dev-00000/series.json").json()
    assert len(series["t"]) == 60 and series["t"] == sorted(series["t"])
    assert all(p95 > p50 for p50, p95 in zip(series["p50"], series["p95"], strict=True))
    assert all(v is not None and v > 0 for v in series["per_s"])
    form = c.get("/rollouts/new")
    assert form.status_code == 200 and 'option value="helpdesk-gen@2"' in form.text and "fleet=pumps" in form.text
    assert c.get("/devices/nope").status_code == 404
    assert c.get("/rollouts/nope").status_code == 404


def test_the_device_list_filters_searches_and_paginates(web: LiveController, seeded: dict[str, Any]) -> None:
    c = web.client
    login(c, "vera")
    labels = all_labels(web)
    first = c.get("/devices")
    assert device_ids(first.text) == sorted(labels)[:50]
    assert "1–50 of 120" in first.text
    third = c.get("/devices", params={"page": 3})
    assert device_ids(third.text) == sorted(labels)[100:] and "101–120 of 120" in third.text
    berlin = c.get("/devices", params={"selector": "site=berlin,tier!=canary"})
    want = sorted(d for d, lab in labels.items() if lab["site"] == "berlin" and lab["tier"] != "canary")
    assert device_ids(berlin.text) == want
    with web.runtime.engine.connect() as conn:
        online = {r.id for r in conn.execute(select(table(Device).c.id).where(table(Device).c.status == "online"))}
    status = c.get("/devices", params={"status": "online", "q": "dev-001"})
    assert device_ids(status.text) == sorted(d for d in online if "dev-001" in d)
    bad = c.get("/devices", params={"selector": "site=a=b"})
    assert bad.status_code == 422 and "selector term" in bad.text
    assert device_ids(c.get("/devices", params={"q": "%"}).text) == []  # LIKE wildcards are literal


LABEL_KEYS = ["site", "tier", "zone", "hw", "missing"]
LABEL_VALUES = ["berlin", "paris", "canary", "prod", "z1", "z3", "pi5", "nuc", "none"]


@st.composite
def selector_terms(draw: st.DrawFn) -> str:
    key = draw(st.sampled_from(LABEL_KEYS))
    op = draw(st.sampled_from(["eq", "ne", "in", "notin", "exists", "absent"]))
    if op in ("in", "notin"):
        values = draw(st.lists(st.sampled_from(LABEL_VALUES), min_size=1, max_size=3, unique=True))
        return f"{key} {op} ({','.join(values)})"
    if op in ("eq", "ne"):
        return f"{key}{'=' if op == 'eq' else '!='}{draw(st.sampled_from(LABEL_VALUES))}"
    return key if op == "exists" else f"!{key}"


def test_selectors_in_sql_match_the_selector_semantics(web: LiveController, seeded: dict[str, Any]) -> None:
    """The device list filters in SQL; it must select exactly what the rollout engine's selectors match."""
    labels = all_labels(web)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(selector_terms(), min_size=1, max_size=3))
    def check(terms: list[str]) -> None:
        parsed = selectors.parse(",".join(terms))
        with web.runtime.engine.connect() as conn:
            page = queries.device_page(conn, status=None, selector=parsed, q=None, offset=0, limit=1000)
        assert [d["id"] for d in page.items] == sorted(d for d, lab in labels.items() if parsed.matches(lab))
        assert page.total == len(page.items)

    check()


def _statements(ctl: LiveController, path: str) -> int:
    with count_statements(ctl.runtime.engine) as seen:
        assert ctl.client.get(path).status_code == 200, path
    return len(seen)


@pytest.mark.slow
def test_pages_run_the_same_few_queries_whatever_the_fleet_size(make_controller: Any) -> None:
    """No query per row: the statement count of each page does not grow with devices, versions or rollouts."""
    counts = []
    for devices, rollouts in ((30, 2), (400, 12)):
        ctl = make_controller(None)
        add_users(ctl.runtime.engine, ("olivia",))
        made = seed(
            ctl.runtime.engine, devices=devices, telemetry_per_device=2, chart_points=devices // 4, rollouts=rollouts
        )
        login(ctl.client, "olivia")
        big = made["big_rollout"]
        paths = {
            "overview": "/",
            "devices": "/devices",
            "filtered": "/devices?selector=site%3Dberlin",
            "device": "/devices/dev-00000",
            "series": "/devices/dev-00000/series.json",
            "models": "/models",
            "rollouts": "/rollouts",
            "rollout": f"/rollouts/{big}",
            "live": f"/rollouts/{big}/live",
            "form": "/rollouts/new",
            "deployments": "/deployments",
            "deployment": f"/deployments/{made['big_deployment']}",
            "deployment_live": f"/deployments/{made['big_deployment']}/live",
            "deploy_form": "/deployments/new",
            "health": "/health",
            "health_version": "/health/pump-anomaly/2?range=7d",
            "health_series": "/health/pump-anomaly/2/series.json",
        }
        counts.append({name: _statements(ctl, path) for name, path in paths.items()})
    small, large = counts
    assert large == small
    # the fleet page is the busiest: its summary (6) and what needs attention (5 bounded queries)
    assert max(small.values()) <= 12, small


def test_static_assets_are_served_and_vendored_with_their_licenses(web: LiveController) -> None:
    c = web.client
    for path, kind in (
        ("/static/vendor/uplot/uPlot.iife.min.js", "javascript"),
        ("/static/app.css", "css"),
        ("/static/dashboard.js", "javascript"),
        ("/static/charts.js", "javascript"),
    ):
        r = c.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
    static = REPO / "controller" / "web" / "static" / "vendor"
    assert "MIT License" in (static / "uplot" / "LICENSE").read_text()
    assert "1.6.32" in (static / "uplot" / "uPlot.iife.min.js").read_text()[:200]
    # nothing is fetched from another host: every src and href is local
    login(c, "vera")
    for page in ("/", "/devices/dev-x", "/login"):
        html = c.get(page).text
        assert not re.search(r'(src|href)="(https?:)?//', html), page


@pytest.mark.slow
def test_an_installed_package_carries_the_templates_and_assets(tmp_path: Path) -> None:
    """Build the wheel from a copy of the sources and render a page from the unpacked wheel alone."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("agent", "controller", "simulations", "benchmarks"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"no build backend in this environment: {built.stderr.strip()[-200:]}")
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("slmfleet-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "controller/web/templates/rollout.html",
        "controller/web/templates/macros.html",
        "controller/web/static/vendor/uplot/uPlot.iife.min.js",
        "controller/web/static/vendor/uplot/LICENSE",
        "controller/web/static/dashboard.js",
        "controller/web/static/app.css",
    ):
        assert needed in names, needed
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from controller.web.render import STATIC, TEMPLATES, make_environment\n"
        "assert str(TEMPLATES).startswith(sys.argv[1]), TEMPLATES\n"
        "html = make_environment().get_template('login.html').render(request=None, me=None, csrf_token='',"
        " login_token='t', next='/', error='', name='')\n"
        "assert 'Log in to slmfleet' in html and (STATIC / 'vendor/uplot/uPlot.min.css').is_file()\n"
        "print('ok')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, str(unpacked)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_a_revoked_device_is_marked_on_the_list_and_its_page(web: LiveController, seeded: dict[str, Any]) -> None:
    c = web.client
    assert login(c, "olivia").status_code == 303
    assert 'data-testid="device-revoked"' not in c.get("/devices/dev-00001").text
    r = c.post("/api/v1/devices/dev-00001/revoke", headers=web.auth)
    assert r.status_code == 200, r.text
    page = c.get("/devices/dev-00001").text
    assert 'data-testid="device-revoked"' in page and '<span class="badge status-revoked">revoked</span>' in page
    listing = c.get("/devices", params={"q": "dev-0000"}).text
    row = next(r for r in rows(listing, "device-table") if "/devices/dev-00001" in r)
    assert "status-revoked" in row

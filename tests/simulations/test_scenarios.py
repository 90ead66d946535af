"""The shipped scenarios run end to end (real broker, a controller process, virtual devices running the
real agent core in worker processes) and meet their own expectations; the report is written and complete.

Reduced sizes keep each run under about a minute on a small machine; ``test_happy_path_1000_devices``
runs the happy path at its full size of 1,000 devices.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from controller.broker.embedded import EmbeddedBroker
from simulations.assertions import evaluate
from simulations.runner import RunOptions, RunResult, run_scenario
from simulations.scenario import bundled, load_scenario

pytestmark = pytest.mark.slow

#: scenario -> devices in CI (the shipped files describe fleets of hundreds or thousands)
REDUCED = {
    "happy-path": 40,
    "bad-model": 40,
    "flaky-network": 40,
    "low-ram-int4": 30,
}


#: bounds on the phases that wait for the fleet (reached only when something is wrong; keeps CI bounded)
LIMITS = {"limits.baseline_max_s": 40, "limits.settle_s": 40, "limits.ready_timeout_s": 60}
#: a run that waited out every limit above takes longer than this; a healthy run on a loaded 2-core CI machine
#: (the suite runs two test files at once) takes well under it
BUDGET_S = 200


def _run(name: str, broker: EmbeddedBroker, out: Path, devices: int | None) -> RunResult:
    scenario = load_scenario(
        bundled(name),
        devices=devices,
        overrides={"broker.url": broker.url, "broker.engine": broker.engine, **LIMITS},
    )
    return run_scenario(scenario, RunOptions(out_dir=out, live=False))


def _explain(result: RunResult) -> str:
    report = result.report
    return (
        f"failed: {result.failures}; error: {report.get('error')}; notes: {report.get('notes')};"
        f" phases: {report.get('phases_s')}; reasons: {report.get('failure_reasons')}; report: {result.html_path}"
    )


def _check_run(result: RunResult, budget_s: float) -> None:
    """The expectations held, and the run stayed within its time budget (a slow run says where it waited)."""
    assert result.ok, _explain(result)
    took = sum((result.report.get("phases_s") or {}).values())
    assert took < budget_s, f"the run took {took:.0f}s, more than {budget_s:.0f}s: {_explain(result)}"


def test_every_shipped_scenario_has_a_ci_size() -> None:
    shipped = sorted(p.stem for p in bundled("happy-path").parent.glob("*.yaml"))
    assert shipped == sorted(REDUCED)
    for name in shipped:
        load_scenario(bundled(name))  # valid at full size too


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_scenario_meets_its_expectations(name: str, private_broker: EmbeddedBroker, tmp_path: Path) -> None:
    result = _run(name, private_broker, tmp_path / "report", REDUCED[name])
    _check_run(result, BUDGET_S)
    report = result.report
    assert report["error"] is None
    assert report["scenario"]["devices"] == REDUCED[name]
    assert report["assertions"] and all(a["ok"] for a in report["assertions"])
    # the devices really were connected and served: the controller agrees with each of them
    assert report["controller_disagreements"] == []
    assert len(report["devices"]["states"]) == REDUCED[name]


def test_report_json_and_html(private_broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A faulty run's report: per-state timeline overall and per wave, download progress, gates, faults."""
    result = _run("flaky-network", private_broker, tmp_path / "report", 30)
    _check_run(result, BUDGET_S)
    assert result.json_path.is_file() and result.html_path.is_file()
    report = json.loads(result.json_path.read_text())
    timeline = report["timeline"]
    assert len(timeline) > 10
    waves = report["rollout"]["waves"]
    assert len(waves) == 3
    for sample in timeline:
        assert {"t", "states", "waves", "download", "gates", "rollout"} <= sample.keys()
        assert len(sample["waves"]) == (len(waves) if sample["rollout"] else 0)
        # every device is counted once per sample (deployment states plus "not started")
        assert sum(n for s, n in sample["states"].items() if s != "offline") == 30
    # time runs from the baseline (before the rollout, negative) to the end
    assert timeline[0]["t"] <= 0 < timeline[-1]["t"]
    seen = {state for s in timeline for state in s["states"]}
    assert {"not started", "downloading", "active"} <= seen
    assert any(p is not None for s in timeline for p in s["download"])
    gates = {g["name"] for s in timeline for g in s["gates"]}
    assert {"error_rate", "p95_latency_ratio"} <= gates
    assert all(g["threshold"] is not None for s in timeline for g in s["gates"] if g["name"] == "error_rate")
    assert report["faults"]["counts"].get("power_loss", 0) >= 1
    assert report["faults"]["events"]
    assert report["phases_s"]["rollout"] > 0
    assert report["resources"]["controller_cpu_s_during_rollout"] is not None

    html = result.html_path.read_text()
    assert html.lower().startswith("<!doctype html>")
    # self-contained: no scripts, styles or images fetched from elsewhere
    assert not re.search(r"""(src|href)=["']https?://""", html)
    for heading in (
        "Devices per state over time",
        "Download progress",
        "Gates against their thresholds",
        "Rollout transitions",
        "Faults",
    ):
        assert heading in html, heading
    # one chart for the fleet, one per wave, the download charts and one per gate
    assert html.count("<svg") >= 1 + len(waves) + 2 + 2
    for wave in waves:
        assert f"({wave['devices']} devices)" in html


def test_happy_path_1000_devices(private_broker: EmbeddedBroker, tmp_path: Path) -> None:
    """The happy path at its full size: 1,000 devices through a canary and three waves."""
    result = _run("happy-path", private_broker, tmp_path / "report", None)
    _check_run(result, 220)
    assert result.report["scenario"]["devices"] == 1000
    assert result.report["rollout"]["state"] == "completed"
    # nothing the 1,000 devices sent was lost: every telemetry message is stored once the controller drained
    stored = result.report["resources"]["controller_telemetry_stored_after_drain"]
    assert stored == result.report["fleet"]["telemetry"] > 1000, (stored, result.report["fleet"])


def test_telemetry_expectation_compares_what_was_stored_with_what_was_sent() -> None:
    scenario = load_scenario(bundled("happy-path"), devices=10)
    assert scenario.expect.telemetry_stored_min == "100%"

    def check(sent: int, stored: float | None) -> dict[str, Any]:
        report = {"fleet": {"telemetry": sent}, "resources": {"controller_telemetry_stored_after_drain": stored}}
        found = [a for a in evaluate(scenario, report, [], versions={}, disagreements=[]) if "telemetry" in a["name"]]
        assert len(found) == 1
        return found[0]

    assert check(500, 500.0)["ok"]
    lost = check(500, 499.0)
    assert not lost["ok"] and lost["actual"] == "499 of 500"
    assert not check(500, None)["ok"]  # the controller's count could not be read: not a pass
    assert not check(0, 0.0)["ok"]  # a fleet that sent nothing proves nothing


def test_a_full_disk_on_the_canary_fails_it_with_the_reason_and_aborts(
    private_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The ``disk_full`` fault: the canary devices report no free disk, the controller finds no variant that
    fits and fails them with that reason, and the rollout aborts in the canary with every device on v1."""
    import yaml

    spec = yaml.safe_load(bundled("bad-model").read_text())
    spec["name"] = "disk-full"
    spec["faults"] = [{"kind": "disk_full", "free_mb": 0.0, "devices": {"labels": {"ring": "canary"}}}]
    spec["expect"] = {
        "rollout_state": "aborted",
        "ended_in_wave": 1,
        "devices": [
            {"version": "v1", "min_share": "100%"},
        ],
        "faults_fired": {"disk_full": "1"},
    }
    path = tmp_path / "disk-full.yaml"
    path.write_text(yaml.safe_dump(spec))
    scenario = load_scenario(
        path, devices=20, overrides={"broker.url": private_broker.url, "broker.engine": private_broker.engine, **LIMITS}
    )
    result = run_scenario(scenario, RunOptions(out_dir=tmp_path / "out", live=False))
    _check_run(result, BUDGET_S)
    reasons = result.report.get("failure_reasons") or {}
    assert reasons and all("MiB of disk" in r for r in reasons), reasons

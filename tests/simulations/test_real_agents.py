"""A shipped scenario with real agent processes beside virtual devices (issue 21): ``fleet.real_agents``.

Three of six devices run as ``slmfleet agent`` processes (real onnxruntime on the registry's artifacts, real
chunk downloads over the scenario's broker, real self-tests, their own data directories), the other three
in a worker process; both populations must take v2 and the report must show them side by side. One real
agent loses power during the rollout (killed, booted again from its data directory) and still ends on v2;
another's link is cut by its loopback proxy (a partition: the broker sends its will, reconnects are refused
until it ends) and it reconnects and ends on v2; the first one's link has 100 ms of latency through its proxy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from simulations.runner import Runner, RunOptions, run_scenario
from simulations.scenario import bundled, load_scenario

pytestmark = pytest.mark.slow

OVERRIDES = {
    "fleet.real_agents": 3,
    "limits.baseline_max_s": 40,
    "limits.settle_s": 40,
    "limits.ready_timeout_s": 90,
    # Real agents share this machine's 2 cores with the controller, the broker and another test file: the p95
    # of a ~1 ms model is scheduling noise there (after/before ratios of 1.7-2.4 were measured with an
    # identical model, see README "Fidelity"). The gate stays on, with room for that noise.
    "rollout.gates.p95_latency_ratio_max": 4.0,
    # sim-00000 and sim-00002 are real agents: the power loss is applied (SIGKILL, a boot from its data
    # directory), the latency and the partition by their loopback proxies; skewing a real agent's clock is not
    # (it uses this machine's) and the report says so
    "faults": [
        {"kind": "power_loss", "at_s": 1, "duration_s": 2, "devices": {"ids": ["sim-00000"]}},
        {"kind": "latency", "latency_ms": 100, "devices": {"ids": ["sim-00000"]}},
        {"kind": "disconnect", "at_s": 1, "duration_s": 3, "devices": {"ids": ["sim-00002"]}},
        {"kind": "clock_skew", "skew_s": 60, "devices": {"ids": ["sim-00000"]}},
    ],
}


def test_real_and_virtual_devices_take_the_rollout_side_by_side(tmp_path: Path) -> None:
    scenario = load_scenario(bundled("happy-path"), devices=6, overrides=OVERRIDES)
    hardware: dict[str, Any] = {}

    links: dict[str, Any] = {}

    def capture(runner: Runner) -> None:
        assert runner.api is not None and runner.real is not None and runner.real.links is not None
        links.update(runner.real.links.links)
        for device in runner.api.devices(q="sim-"):
            if device["id"] in runner.real.agents:
                hardware[device["id"]] = (device.get("hardware") or {}, device.get("labels") or {})

    result = run_scenario(scenario, RunOptions(out_dir=tmp_path / "out", live=False, on_rollout=capture))
    report = result.report
    assert result.ok, f"{result.failures}; error {report.get('error')}; notes {report.get('notes')}"

    pops = report["populations"]
    assert pops["real"]["devices"] == 3 and pops["virtual"]["devices"] == 3
    for name in ("real", "virtual"):
        serving = pops[name]["final_models"]
        assert set(serving) <= {"classifier v2 int8", "classifier v2 fp32"}, (name, serving)
        assert sum(serving.values()) == 3, (name, serving)
        assert sum(w["devices"] for w in pops[name]["waves"]) == 3, pops[name]["waves"]
        assert all(w["final"] == {"active": w["devices"]} for w in pops[name]["waves"] if w["devices"])
        judged = [w for w in pops[name]["gates"] if w["devices"]]
        assert judged and all(w["gates"]["error_rate"]["value"] is not None for w in judged), pops[name]["gates"]

    # the real agents reported their profile's hardware (the controller picks variants as for that device)
    specs = {d["id"]: d for d in pops["real"]["specs"]}
    assert set(hardware) == set(specs)
    for device, (hw, labels) in hardware.items():
        assert hw["arch"] == specs[device]["arch"] and hw["ram_bytes"] == specs[device]["ram_bytes"], (device, hw)
        assert labels.get("profile") == specs[device]["profile"]
    assert {d["profile"] for d in specs.values()} == {"gateway-x86", "box-arm64"}

    assert report["faults"]["counts"].get("power_loss") == 1 and pops["real"]["restarts"] == 1
    assert report["faults"]["counts"].get("disconnect") == 1
    assert [(f["kind"], f["real_agents"]) for f in pops["faults_not_applied"]] == [("clock_skew", 1)]
    # the partitioned agent's connection was cut, its reconnects refused while the partition lasted, and it
    # came back through its proxy (it ended on v2 above); the other's traffic went through its delayed link
    cut = links["sim-00002"]
    assert cut.cuts == 1 and cut.refused >= 1 and cut.connections >= 2 and cut.bytes_down > 0, cut
    assert links["sim-00000"].latency_ms == 100 and links["sim-00000"].connections >= 2, links["sim-00000"]

    assert report["calibration"]["latency"] == "assumed"
    html = result.html_path.read_text()
    assert "Real agents and virtual devices" in html and "Calibration of the virtual devices" in html

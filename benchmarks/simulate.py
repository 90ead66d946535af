"""The simulator (issue 7): how many virtual devices this machine keeps connected and sending telemetry
(goal >= 5,000), and a 1,000-device rollout of a 5 MB artifact (time to complete, controller CPU).

Both parts run the real thing: ``simulations.runner`` starts a private broker, a controller process and
worker processes of virtual devices (the real agent core, one MQTT connection each).

* ``fleet``: fleets of growing size (no model, telemetry every 5 s) until one does not get online within
  its deadline or the time budget is spent; per size: time to connect and be online in the controller,
  telemetry messages per second the fleet sent, and the CPU of the controller, the broker and the workers.
* ``rollout``: the happy-path scenario with a 5 MB fp32 classifier (v1 installed, v2 rolled out through a
  canary and three waves with short bakes).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations.runner import RunOptions, run_scenario
from simulations.scenario import Scenario, bundled, load_scenario, parse_scenario

#: seconds the fleet keeps sending telemetry once it is online
HOLD_S = 20.0
#: telemetry period of the connected fleet
TELEMETRY_S = 5.0


def _fleet_scenario(devices: int) -> Scenario:
    return parse_scenario(
        {
            "name": f"bench-fleet-{devices}",
            "seed": 1,
            "controller": {"settings": {"sweep_interval_s": 5}},
            "fleet": {
                "devices": devices,
                "telemetry_interval_s": TELEMETRY_S,
                "keepalive_s": 60,
                "inference_rate": 0,
                "connect_rate": 2000,
                "devices_per_process": 2500,
                "profiles": [{"name": "gateway", "cpu_speed": 1.0, "ram_mb": 2048}],
            },
            "expect": {"no_device_stuck": True, "controller_agrees": True, "telemetry_stored_min": "100%"},
            "limits": {"max_run_s": 600, "ready_timeout_s": 180, "baseline_s": HOLD_S, "settle_s": 0},
        },
        f"fleet of {devices}",
    )


def _steady_rate(timeline: list[dict[str, Any]]) -> float | None:
    """Telemetry messages per second the fleet sent over the last part of the hold, once all were online."""
    if len(timeline) < 2:
        return None
    end = timeline[-1]
    start = next((x for x in timeline if x["at"] >= end["at"] - (HOLD_S - 5.0)), timeline[0])
    if end["at"] - start["at"] <= 0:
        return None
    return round((end["telemetry"] - start["telemetry"]) / (end["at"] - start["at"]), 1)


def _fleet(devices: int, out: Path) -> dict[str, Any]:
    started = time.time()
    result = run_scenario(_fleet_scenario(devices), RunOptions(out_dir=out, live=False))
    report = result.report
    fleet = report.get("fleet") or {}
    res = report.get("resources") or {}
    phases = report.get("phases_s") or {}
    return {
        "devices": devices,
        "ok": result.ok and report.get("error") is None,
        "error": report.get("error"),
        "online_s": phases.get("fleet"),
        "hold_s": phases.get("run"),
        "telemetry_sent": fleet.get("telemetry"),
        "telemetry_stored_by_controller_at_end": res.get("controller_telemetry_ingested"),
        "telemetry_stored_by_controller_after_drain": res.get("controller_telemetry_stored_after_drain"),
        "telemetry_per_s_steady": _steady_rate(report.get("timeline") or []),
        "telemetry_per_s_expected": round(devices / TELEMETRY_S, 1),
        "connects": fleet.get("connects"),
        "controller_cpu_s": res.get("controller_cpu_s_total"),
        "broker_cpu_s": res.get("broker_cpu_s_total"),
        "worker_processes": (report.get("infrastructure") or {}).get("worker_processes"),
        "worker_cpu_s": res.get("worker_cpu_s"),
        "worker_max_rss_mb": res.get("worker_max_rss_mb"),
        "wall_s": round(time.time() - started, 1),
    }


def _rollout(devices: int, out: Path) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "name": "bench-rollout-5mb",
        "models.0.versions.0.generator.size_mb": 5,
        "models.0.versions.1.generator.size_mb": 5,
        "models.0.versions.0.variants": ["fp32"],
        "models.0.versions.1.variants": ["fp32"],
        "expect.devices": [{"version": "v2", "min_share": "100%"}],
        "expect.max_duration_s": 600,
        "limits.max_run_s": 900,
    }
    scenario = load_scenario(bundled("happy-path"), devices=devices, overrides=overrides)
    started = time.time()
    result = run_scenario(scenario, RunOptions(out_dir=out, live=False))
    report = result.report
    res = report.get("resources") or {}
    variants: dict[str, Any] = ((report.get("models") or {}).get("classifier@v2") or {}).get("variants") or {}
    artifact: dict[str, Any] = next(iter(variants.values()), {})
    fleet = report.get("fleet") or {}
    return {
        "devices": devices,
        "ok": result.ok,
        "failures": result.failures,
        "artifact_mb": round(artifact.get("size_bytes", 0) / 1e6, 2),
        "rollout_s": report.get("rollout_duration_s"),
        "rollout_state": (report.get("rollout") or {}).get("state"),
        "controller_cpu_s_during_rollout": res.get("controller_cpu_s_during_rollout"),
        "broker_cpu_s_during_rollout": res.get("broker_cpu_s_during_rollout"),
        "worker_cpu_s": res.get("worker_cpu_s"),
        "mb_received_by_devices": round(fleet.get("bytes_in", 0) / 1e6, 1),
        "chunk_frames_received_by_devices": fleet.get("chunk_frames"),
        "chunks_published_by_controller": res.get("controller_chunks_published"),
        "phases_s": report.get("phases_s"),
        "wall_s": round(time.time() - started, 1),
    }


def run(quick: bool = False) -> dict[str, Any]:
    logging.getLogger("simulations").setLevel(logging.WARNING)
    sizes = [500, 1000] if quick else [1000, 2500, 5000, 7500, 10000]
    budget_s = 240.0 if quick else 600.0
    rollout_devices = 200 if quick else 1000
    steps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-simulate-") as tmp:
        started = time.monotonic()
        for n in sizes:
            if time.monotonic() - started > budget_s:
                break
            step = _fleet(n, Path(tmp) / f"fleet-{n}")
            steps.append(step)
            if not step["ok"]:
                break
        rollout = _rollout(rollout_devices, Path(tmp) / "rollout")
    best = max((s["devices"] for s in steps if s["ok"]), default=0)
    return {
        "max_devices_connected_and_reporting": best,
        "goal_devices": 5000,
        "fleet_steps": steps,
        "rollout_5mb": rollout,
    }

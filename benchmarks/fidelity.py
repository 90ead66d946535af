"""Does the simulator predict the real rollout (issue 21)? Each shipped scenario at a size real agents reach on
this machine, once with every device a real agent process (``fleet.real_agents`` = all: ``slmfleet agent``
with real onnxruntime, downloads and self-tests) and once all virtual, several runs each.

Per scenario: the outcome of every run (rollout state, the wave it ended in, the gates that failed),
whether all runs of both kinds agree, each wave's duration (from the rollout's transitions) as a ratio
virtual/real of the means, the gate values the controller judged each wave with (mean and run-to-run range
per kind, and whether the virtual mean lies within the real runs' range), and what the virtual device model
leaves out where they differ (``KNOWN``: the scenario's assumptions real agents cannot reproduce, and the
faults not applied to real agents, from each run's report).

Both kinds run in this one process, one after the other, on the same machine: the ratios compare like with
like. ``--quick``: fewer devices, one run of each kind.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations.runner import RunOptions, run_scenario
from simulations.scenario import bundled, load_scenario

SCENARIOS = ("happy-path", "bad-model", "flaky-network", "low-ram-int4")
#: bounds on the waiting phases (reached only when something is wrong)
LIMITS = {"limits.baseline_max_s": 60, "limits.settle_s": 40, "limits.ready_timeout_s": 120}
#: what the virtual device model assumes that real agents on this machine do not reproduce, per scenario
KNOWN = {
    "happy-path": [],
    "bad-model": [],
    "flaky-network": [
        "latency, loss, bandwidth caps and disconnects reach real agents through their loopback TCP proxies,"
        " but loss differs in kind: a virtual link drops whole chunk frames (asked again after chunk_idle_s)"
        " where the proxy delays a read by the retransmission timeout, as TCP does",
        "corrupted chunks and clock skew are simulated on virtual devices only (power loss is applied to real"
        " agents: SIGKILL and a restart)",
    ],
    "low-ram-int4": [],
}


#: devices a wave adds at the least at the benchmark's size: the shipped waves' shares were written for
#: hundreds of devices, and at 10 a "1%" canary is one device whose gate evidence (the paired p95 ratio over
#: its own few reports) seldom decides within the scenario's 60 s deadline
MIN_WAVE = 3


def sized_waves(waves: list[dict[str, Any]], devices: int) -> list[dict[str, Any]]:
    """The scenario's waves with each share turned into a count of at least ``MIN_WAVE`` more devices than the
    wave before (a last wave that would add fewer is merged into the one before it). Waves picked by a
    selector, and every wave of a plan that has one, stay as they are (their sizes are the selector's)."""
    if any(w.get("selector") for w in waves):
        return waves
    out: list[dict[str, Any]] = []
    before = 0
    for wave in waves:
        until = str(wave.get("until", "100%"))
        wanted = math.ceil(float(until[:-1]) * devices / 100) if until.endswith("%") else int(float(until))
        count = min(devices, max(wanted, before + MIN_WAVE))
        if devices - count < MIN_WAVE:
            count = devices
        out.append({**wave, "until": str(count)})
        before = count
        if count >= devices:
            break
    return out


def _outcome(report: dict[str, Any]) -> dict[str, Any]:
    rollout = report.get("rollout") or {}
    failed = sorted({g["name"] for g in rollout.get("gates") or [] if g.get("status") == "fail"})
    # why it ended: the transition into aborting (gates, failures) rather than the rollback's last word
    ending = [t for t in rollout.get("transitions") or [] if t.get("to_state") in ("aborting", "completed", "paused")]
    reason = (ending[0]["reason"] if ending else rollout.get("reason")) or ""
    if not failed and "gate" in reason:
        failed = sorted({g["name"] for g in rollout.get("gates") or [] if g["name"] in reason})
    return {
        "state": rollout.get("state"),
        "wave": (rollout.get("wave_index", 0) + 1) if rollout else None,
        "failed_gates": failed,
        "reason": reason[:200],
        # what the failed gates saw (value, bounds, devices judged): why a run ended, kept after the run
        "failed_gate_details": [
            {k: g.get(k) for k in ("name", "value", "low", "high", "samples", "detail")}
            for g in rollout.get("gates") or []
            if g.get("name") in failed
        ],
    }


def _gate_values(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Wave (from 1) -> gate -> the last value the controller judged that wave with."""
    out: dict[str, dict[str, float]] = {}
    for sample in report.get("timeline") or []:
        if sample.get("wave") is None or sample.get("rollout") not in ("gating", "baking", "aborting"):
            continue
        for g in sample.get("gates") or []:
            if g.get("value") is not None:
                out.setdefault(str(sample["wave"] + 1), {})[g["name"]] = float(g["value"])
    return out


def _one(name: str, devices: int, real: bool, root: Path) -> dict[str, Any]:
    overrides: dict[str, Any] = {**LIMITS, "fleet.real_agents": devices if real else 0}
    shipped = load_scenario(bundled(name), devices=devices, overrides=overrides)
    overrides["rollout.waves"] = sized_waves(list((shipped.rollout or {}).get("waves") or []), devices)
    scenario = load_scenario(bundled(name), devices=devices, overrides=overrides)
    started = time.monotonic()
    result = run_scenario(scenario, RunOptions(out_dir=root, live=False))
    report = result.report
    pops = report.get("populations") or {}
    return {
        "ok": result.ok,
        "failures": result.failures,
        "error": report.get("error"),
        "outcome": _outcome(report),
        "wave_durations_s": report.get("wave_durations_s") or [],
        "gates": _gate_values(report),
        "rollout_s": report.get("rollout_duration_s"),
        "wall_s": round(time.monotonic() - started, 1),
        "faults_not_applied": pops.get("faults_not_applied") or [],
        # reports whose p50 jumped past 5x the run's median (the machine's other work stalling real agents)
        "latency_stalls": (pops.get("real" if real else "virtual") or {}).get("latency_stalls"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "faults_fired": (report.get("faults") or {}).get("counts") or {},
        "report": str(result.json_path),
    }


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def _compare(name: str, real: list[dict[str, Any]], virtual: list[dict[str, Any]]) -> dict[str, Any]:
    def key(run: dict[str, Any]) -> tuple[Any, ...]:
        o = run["outcome"]
        return (o["state"], o["wave"], tuple(o["failed_gates"]))

    outcomes = {key(r) for r in real + virtual}
    waves = max((len(r["wave_durations_s"]) for r in real + virtual), default=0)
    ratios: list[float | None] = []
    per_wave = []
    for i in range(waves):
        rv = [r["wave_durations_s"][i] for r in real if i < len(r["wave_durations_s"]) and r["wave_durations_s"][i]]
        vv = [r["wave_durations_s"][i] for r in virtual if i < len(r["wave_durations_s"]) and r["wave_durations_s"][i]]
        ratio = round(statistics.fmean(vv) / statistics.fmean(rv), 3) if rv and vv else None
        ratios.append(ratio)
        per_wave.append({"wave": i + 1, "real_s": rv, "virtual_s": vv, "ratio_virtual_over_real": ratio})
    gates: dict[str, dict[str, Any]] = {}
    for wave in sorted({w for r in real + virtual for w in r["gates"]}):
        for gate in sorted({g for r in real + virtual for g in r["gates"].get(wave, {})}):
            rv = [r["gates"][wave][gate] for r in real if gate in r["gates"].get(wave, {})]
            vv = [r["gates"][wave][gate] for r in virtual if gate in r["gates"].get(wave, {})]
            vm = _mean(vv)
            gates[f"wave {wave} {gate}"] = {
                "real": {"mean": _mean(rv), "min": min(rv, default=None), "max": max(rv, default=None), "n": len(rv)},
                "virtual": {
                    "mean": vm,
                    "min": min(vv, default=None),
                    "max": max(vv, default=None),
                    "n": len(vv),
                },
                "virtual_mean_within_real_range": (min(rv) <= vm <= max(rv)) if rv and vm is not None else None,
            }
    not_applied = sorted({f"{f['kind']} ({f['why']})" for r in real for f in r["faults_not_applied"]})
    within = [abs(r - 1.0) <= 0.2 for r in ratios if r is not None]
    return {
        "outcomes_real": [r["outcome"] for r in real],
        "outcomes_virtual": [r["outcome"] for r in virtual],
        "same_outcome_every_run": len(outcomes) == 1,
        "waves": per_wave,
        "wave_ratios_within_20pct": all(within) if within else None,
        "gates": gates,
        "why_they_differ": KNOWN.get(name, []),
        "faults_not_applied_to_real_agents": not_applied,
    }


def run(quick: bool = False, scenarios: tuple[str, ...] = (), runs: int | None = None) -> dict[str, Any]:
    devices = 6 if quick else 10
    runs = runs or (1 if quick else 2)
    out: dict[str, Any] = {
        "devices": devices,
        "runs_per_kind": runs,
        "conditions": "every device a real agent process vs every device virtual; one controller, broker and"
        " fleet on this machine (2 cores, shared with whatever else runs)",
        "scenarios": {},
        # the machine's load while it ran (other work on a shared machine stalls real agents, not virtual ones)
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-fidelity-") as tmp:
        for name in scenarios or SCENARIOS:
            real, virtual = [], []
            for i in range(runs):
                real.append(_one(name, devices, True, Path(tmp) / f"{name}-real-{i}"))
                virtual.append(_one(name, devices, False, Path(tmp) / f"{name}-virtual-{i}"))
            summary = _compare(name, real, virtual)
            for runs_of_kind in (real, virtual):
                for r in runs_of_kind:
                    r.pop("report", None)
            out["scenarios"][name] = {**summary, "runs_real": real, "runs_virtual": virtual}
            # each scenario as it finishes (a long run stopped early keeps what it measured)
            print("fidelity " + json.dumps({name: out["scenarios"][name]}), file=sys.stderr, flush=True)
    out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return out

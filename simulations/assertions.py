"""The scenario's expectations, checked against what the run measured.

Each check yields ``{"name", "expected", "actual", "ok"}``; the run passes when every check does.
Device conditions are judged on the devices' own truth (their slots and deployment records), and
``controller_agrees`` then checks that the controller's registry says the same.
"""

from __future__ import annotations

from typing import Any

from simulations.plan import DeviceSpec, select
from simulations.scenario import DeviceExpectation, Scenario, amount, share

MOVING = ("downloading", "verifying", "staged", "shadow", "activating", "rolling_back")


def _check(name: str, expected: Any, actual: Any, ok: bool) -> dict[str, Any]:
    return {"name": name, "expected": expected, "actual": actual, "ok": bool(ok)}


def _device_condition(
    exp: DeviceExpectation,
    devices: list[DeviceSpec],
    states: dict[str, list[Any]],
    scenario: Scenario,
    versions: dict[tuple[str, str], int],
) -> dict[str, Any]:
    chosen = select(devices, exp.devices, scenario.seed, "expect")
    wanted_version = None
    if exp.version is not None:
        model = (
            exp.model or (scenario.rollout or {}).get("model") or (scenario.models[0].name if scenario.models else "")
        )
        key = exp.version if isinstance(exp.version, str) else f"v{exp.version}"
        wanted_version = versions.get((model, key), exp.version if isinstance(exp.version, int) else None)
    matched = 0
    for d in chosen:
        st = states.get(d.id)
        if st is None:
            continue
        state, _progress, version, variant, _dep, _connected, model_name = st[:7]
        ok = True
        if exp.model is not None and model_name != exp.model:
            ok = False
        if wanted_version is not None and version != wanted_version:
            ok = False
        if exp.variant is not None and variant != exp.variant:
            ok = False
        if exp.state is not None and state != exp.state:
            ok = False
        matched += ok
    total = len(chosen)
    got = matched / total if total else 0.0
    low = share(exp.min_share)
    high = share(exp.max_share) if exp.max_share is not None else 1.0
    what = ", ".join(
        f"{k} {v}"
        for k, v in (("model", exp.model), ("version", exp.version), ("variant", exp.variant), ("state", exp.state))
        if v is not None
    )
    sel = exp.devices.model_dump(exclude_none=True, exclude_defaults=True) or "all"
    bound = f">= {low:.0%}" + (f" and <= {high:.0%}" if exp.max_share is not None else "")
    return _check(
        f"devices {sel}: {what}",
        f"{bound} of {total}",
        f"{matched} of {total} ({got:.1%})",
        total > 0 and low - 1e-9 <= got <= high + 1e-9,
    )


def evaluate(
    scenario: Scenario,
    report: dict[str, Any],
    devices: list[DeviceSpec],
    *,
    versions: dict[tuple[str, str], int],
    disagreements: list[str] | None,
) -> list[dict[str, Any]]:
    """Every expectation of ``scenario`` against ``report`` (see the module docstring)."""
    exp = scenario.expect
    out: list[dict[str, Any]] = []
    rollout = report.get("rollout") or {}
    state = rollout.get("state")
    if exp.rollout_state is not None:
        wanted = [exp.rollout_state] if isinstance(exp.rollout_state, str) else exp.rollout_state
        out.append(_check("rollout state", " or ".join(wanted), state, state in wanted))
    if exp.max_duration_s is not None:
        took = report.get("rollout_duration_s")
        out.append(
            _check(
                "rollout duration (s)",
                f"<= {exp.max_duration_s:g}",
                took,
                took is not None and took <= exp.max_duration_s,
            )
        )
    if exp.ended_in_wave is not None:
        index = rollout.get("wave_index")
        wave = index + 1 if isinstance(index, int) else None  # counted from 1, as the CLI and dashboard show it
        out.append(_check("rollout ended in wave", exp.ended_in_wave, wave, wave == exp.ended_in_wave))
    transitions = rollout.get("transitions") or []
    if exp.reason_contains is not None:
        reasons = [t.get("reason", "") for t in transitions]
        hit = next((r for r in reasons if exp.reason_contains in r), None)
        out.append(
            _check("a transition's reason", f"contains {exp.reason_contains!r}", hit or reasons[-3:], hit is not None)
        )
    if exp.gate_failed is not None:
        failed = sorted(
            {g["name"] for s in report.get("timeline", []) for g in s.get("gates", []) if g.get("status") == "fail"}
        )
        failed_in_reason = any(
            t.get("event") == "gates_failed" and exp.gate_failed in t.get("reason", "") for t in transitions
        )
        out.append(_check("gate failed", exp.gate_failed, failed, exp.gate_failed in failed or failed_in_reason))
    states = (report.get("devices") or {}).get("states", {})
    for expectation in exp.devices:
        out.append(_device_condition(expectation, devices, states, scenario, versions))
    if exp.no_device_stuck:
        stuck = sorted(d for d, st in states.items() if st[0] in MOVING)
        out.append(
            _check(
                "no device stuck mid-deployment",
                0,
                len(stuck) if not stuck else f"{len(stuck)}: {stuck[:5]}",
                not stuck and bool(states),
            )
        )
    if exp.controller_agrees:
        if disagreements is None:
            out.append(_check("controller agrees with every device", 0, "not checked (no controller view)", False))
        else:
            out.append(
                _check(
                    "controller agrees with every device",
                    0,
                    len(disagreements) if not disagreements else f"{len(disagreements)}: {disagreements[:3]}",
                    not disagreements,
                )
            )
    if exp.telemetry_stored_min is not None:
        sent = (report.get("fleet") or {}).get("telemetry", 0)
        stored = (report.get("resources") or {}).get("controller_telemetry_stored_after_drain")
        # real agents' messages are stored too but not counted device-side: they are left out of both sides
        real_rows = (report.get("resources") or {}).get("real_agents_telemetry_stored")
        if stored is not None and real_rows is not None:
            stored = max(0.0, stored - real_rows)
        need = share(exp.telemetry_stored_min)
        got = f"{stored:.0f} of {sent}" if stored is not None else "not read"
        ok = stored is not None and sent > 0 and stored >= need * sent
        if real_rows is not None and sent == 0:  # every device a real agent: nothing to count device-side
            got, ok = f"not counted for real agents ({real_rows} of their messages stored)", real_rows > 0
        least = f">= {exp.telemetry_stored_min} of what was sent"
        out.append(_check("telemetry stored by the controller", least, got, ok))
    counts = (report.get("faults") or {}).get("counts", {})
    for kind, at_least in exp.faults_fired.items():
        need = amount(at_least, len(devices)) if at_least.endswith("%") else int(float(at_least))
        got = counts.get(kind, 0)
        out.append(_check(f"faults fired: {kind}", f">= {need}", got, got >= need))
    return out

"""A rollout as the dashboard shows it: waves with live device counts, gates against thresholds, the audit log.

Device counts come from the deployment targets the delivery service flushes every second, grouped in
SQL, so a page never pulls a finished rollout's devices into the delivery service's memory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select

from controller.db.models import DeploymentTarget, Rollout, RolloutTransition, table
from controller.rollouts.gates import passed_waves
from controller.rollouts.machine import TRANSITIONS, RolloutEvent, RolloutState
from controller.rollouts.plan import RolloutCreate, default_plan, wave_sizes
from controller.web.queries import audit_entries

ACTIONS = ("approve", "pause", "resume", "advance", "abort")
#: gate name -> (spec field, comparison, what it measures)
GATES = {
    "error_rate": ("error_rate_max", "<=", "errors per inference on the new version"),
    "p95_latency_ratio": (
        "p95_latency_ratio_max",
        "<=",
        "p95 latency (per token for generation), new over previous version, each device against itself",
    ),
    "rss_ratio": ("rss_ratio_max", "<=", "the model's own memory, new over previous version, per device"),
    "shadow_agreement": ("shadow_agreement_min", ">=", "candidate agrees with the active model in shadow"),
}
FAILED = frozenset({"failed"})
IN_FLIGHT = frozenset({"pending", "idle", "downloading", "verifying", "staged", "shadow", "activating", "rolling_back"})


def allowed_actions(state: str) -> list[str]:
    """The operator actions the state machine accepts in ``state``."""
    s = RolloutState(state)
    out = []
    if s == RolloutState.AWAITING_APPROVAL:
        out.append("approve")
    if (s, RolloutEvent.PAUSE) in TRANSITIONS:
        out.append("pause")
    if s == RolloutState.PAUSED:
        out.append("resume")
    if (s, RolloutEvent.ADVANCE) in TRANSITIONS:
        out.append("advance")
    if (s, RolloutEvent.ABORT) in TRANSITIONS:
        out.append("abort")
    return out


@dataclass
class RolloutView:
    rollout: dict[str, Any]
    spec: RolloutCreate
    waves: list[dict[str, Any]]
    gates: list[dict[str, Any]]
    transitions: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    totals: dict[str, int]
    actions: list[str]

    @property
    def final(self) -> bool:
        return self.rollout["state"] in ("completed", "aborted")


def rollout_view(conn: Connection, rollout_id: str) -> RolloutView | None:
    r = conn.execute(select(table(Rollout)).where(table(Rollout).c.id == rollout_id)).first()
    if r is None:
        return None
    row = dict(r._mapping)
    spec = RolloutCreate.model_validate(row["spec"])
    plan = spec.waves or default_plan()
    per_wave = Counter(row["assignment"].values())
    sizes = wave_sizes(plan, len(row["assignment"]))
    deployments: dict[str, str] = row["wave_deployments"]
    t = table(DeploymentTarget).c
    counts: dict[str, dict[str, int]] = {}
    progress: dict[str, float] = {}
    if deployments:
        for dep_id, state, n, mean in conn.execute(
            select(t.deployment_id, t.state, func.count(), func.avg(t.progress))
            .where(t.deployment_id.in_(list(deployments.values())))
            .group_by(t.deployment_id, t.state)
        ):
            counts.setdefault(dep_id, {})[state] = n
            if state == "downloading":
                progress[dep_id] = float(mean or 0.0)
    tr = table(RolloutTransition).c
    passed = passed_waves(
        (x.from_state, x.reason)
        for x in conn.execute(
            select(tr.from_state, tr.reason).where(tr.rollout_id == rollout_id, tr.from_state == "gating")
        )
    )
    waves = []
    totals: Counter[str] = Counter()
    for i, w in enumerate(plan):
        dep = deployments.get(str(i))
        c = counts.get(dep, {}) if dep else {}
        devices = per_wave.get(i, 0) or sizes[i]
        active = c.get("active", 0)
        failed = sum(n for s, n in c.items() if s in FAILED)
        totals.update(
            {
                "devices": devices,
                "active": active,
                "succeeded": active if i in passed else 0,
                "failed": failed,
                "in_flight": sum(n for s, n in c.items() if s in IN_FLIGHT),
            }
        )
        status = "done" if i < row["wave_index"] else ("current" if i == row["wave_index"] else "waiting")
        if row["state"] == "completed":
            status = "done"
        waves.append(
            {
                "index": i,
                "name": w.name or w.until,
                "until": w.until,
                "selector": w.selector,
                "devices": devices,
                "deployment_id": dep,
                "counts": dict(sorted(c.items())),
                "active": active,
                "succeeded": active if i in passed else 0,
                "failed": failed,
                "download": progress.get(dep or ""),
                "status": status,
                "bake_s": w.bake_s,
                "success_threshold": w.success_threshold,
                "failure_threshold": w.failure_threshold,
                "max_concurrent": w.max_concurrent,
                "require_approval": w.require_approval,
                "done_pct": 100.0 * active / devices if devices else 0.0,
                "failed_pct": 100.0 * failed / devices if devices else 0.0,
            }
        )
    evaluated = {g["name"]: g for g in row["gate_results"]}
    gates = []
    for name, (field_name, comparison, what) in GATES.items():
        if name == "shadow_agreement" and spec.shadow is None:
            continue
        threshold = getattr(spec.gates, field_name)
        g = evaluated.get(name)
        gates.append(
            {
                "name": name,
                "what": what,
                "comparison": comparison,
                "threshold": threshold,
                "value": g.get("value") if g else None,
                "low": g.get("low") if g else None,
                "high": g.get("high") if g else None,
                "confidence": g.get("confidence") if g else None,
                "samples": g.get("samples") if g else None,
                "min_samples": g.get("min_samples") if g else spec.gates.min_samples,
                "status": (g["status"] if g else ("off" if threshold is None else "not yet")),
                "detail": g.get("detail", "") if g else "",
            }
        )
    transitions = [
        dict(x._mapping)
        for x in conn.execute(
            select(tr.at, tr.from_state, tr.event, tr.to_state, tr.wave, tr.reason, tr.actor)
            .where(tr.rollout_id == rollout_id)
            .order_by(tr.id.desc())
            .limit(200)
        )
    ]
    row.pop("assignment")
    row["devices"] = sum(per_wave.values())
    return RolloutView(
        rollout=row,
        spec=spec,
        waves=waves,
        gates=gates,
        transitions=transitions,
        audit=audit_entries(conn, target=rollout_id, limit=50),
        totals=dict(totals),
        actions=allowed_actions(row["state"]),
    )

"""What the dashboard reads: a few set-based queries per page, never one per row.

Everything here selects only the columns a page shows (no ORM objects, no manifests or assignments it
does not need), filters and paginates in SQL, and counts in SQL where the database can.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, func, null, or_, select, true

from controller.db.models import (
    Artifact,
    AuditEntry,
    Deployment,
    DeploymentTarget,
    Device,
    DeviceEvent,
    ImportJob,
    Model,
    ModelVersion,
    Rollout,
    TelemetryRecord,
    table,
)
from controller.devices.selectors import Selector, Term
from controller.rollouts.machine import ACTIVE_STATES

# ------------------------------------------------------------------ helpers --


def label_clause(term: Term) -> ColumnElement[bool]:
    """One selector term as SQL on the JSON labels column (SQLite json_extract, PostgreSQL ->>)."""
    value = table(Device).c.labels[term.key].as_string()
    if term.op == "eq":
        return value == term.values[0]
    if term.op == "ne":  # as in Kubernetes: a device without the key matches key!=v
        return or_(value.is_(None), value != term.values[0])
    if term.op == "in":
        return value.in_(term.values)
    if term.op == "notin":
        return or_(value.is_(None), value.notin_(term.values))
    if term.op == "exists":
        return value.is_not(None)
    return value.is_(None)  # absent


def json_object_size(conn: Connection, column: ColumnElement[Any]) -> ColumnElement[Any]:
    """The number of keys of a JSON object column, counted by the database (NULL where it cannot)."""
    if conn.dialect.name == "sqlite":
        return select(func.count()).select_from(func.json_each(column).table_valued("key")).scalar_subquery()
    if conn.dialect.name == "postgresql":
        keys = func.json_object_keys(column).table_valued("key")
        return select(func.count()).select_from(keys).scalar_subquery()
    return null()


def selector_clause(selector: Selector) -> ColumnElement[bool]:
    return and_(true(), *(label_clause(t) for t in selector.terms))


def active_model(installed: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The model a device serves: the installed entry marked active (the first one if none is marked)."""
    if not installed:
        return None
    return next((m for m in installed if m.get("active", True)), None)


def model_label(m: dict[str, Any] | None) -> str:
    return f"{m['model']} v{m['version']} ({m['variant']})" if m else "no model"


# ------------------------------------------------------------------- fleet --


@dataclass
class FleetSummary:
    total: int
    by_status: dict[str, int]
    by_model: list[tuple[str, int]]
    by_label: list[tuple[str, int, list[tuple[str, int]]]]
    active_rollouts: list[dict[str, Any]]
    recent_audit: list[dict[str, Any]]


#: labels and served models counted by the database: one row per distinct value, not per device
_LABEL_COUNTS = {
    "sqlite": "SELECT j.key, j.value, count(*) FROM device, json_each(device.labels) AS j GROUP BY j.key, j.value",
    "postgresql": "SELECT j.key, j.value, count(*) FROM device, json_each_text(device.labels) AS j"
    " GROUP BY j.key, j.value",
}
_MODEL_COUNTS = {
    "sqlite": "SELECT json_extract(j.value, '$.model'), json_extract(j.value, '$.version'),"
    " json_extract(j.value, '$.variant'), count(DISTINCT device.id) FROM device, json_each(device.installed)"
    " AS j WHERE coalesce(json_extract(j.value, '$.active'), 1) = 1 GROUP BY 1, 2, 3",
    "postgresql": "SELECT j.value->>'model', (j.value->>'version')::int, j.value->>'variant', count(DISTINCT device.id)"
    " FROM device, json_array_elements(device.installed) AS j(value)"
    " WHERE coalesce((j.value->>'active')::boolean, true) GROUP BY 1, 2, 3",
}


def label_counts(conn: Connection) -> Counter[tuple[str, str]]:
    """How many devices carry each ``key=value`` label."""
    sql = _LABEL_COUNTS.get(conn.dialect.name)
    if sql is not None:
        return Counter({(k, str(v)): n for k, v, n in conn.exec_driver_sql(sql)})
    pairs: Counter[tuple[str, str]] = Counter()
    for (labels,) in conn.execute(select(table(Device).c.labels)):
        pairs.update((labels or {}).items())
    return pairs


def model_counts(conn: Connection) -> Counter[tuple[str, int, str]]:
    """How many devices serve each (model, version, variant)."""
    sql = _MODEL_COUNTS.get(conn.dialect.name)
    if sql is not None:
        return Counter({(m, int(v), x): n for m, v, x, n in conn.exec_driver_sql(sql) if m is not None})
    serving: Counter[tuple[str, int, str]] = Counter()
    for (installed,) in conn.execute(select(table(Device).c.installed)):
        active = active_model(installed)
        if active:
            serving[(active["model"], active["version"], active["variant"])] += 1
    return serving


def fleet_summary(conn: Connection, label_keys: int = 8, label_values: int = 8) -> FleetSummary:
    """Devices by status, by served model and by label, all counted by the database."""
    d = table(Device).c
    by_status = {
        row.status: row.n for row in conn.execute(select(d.status, func.count().label("n")).group_by(d.status))
    }
    total = sum(by_status.values())
    serving = model_counts(conn)
    by_model = [(model_label({"model": m, "version": v, "variant": x}), n) for (m, v, x), n in serving.most_common()]
    if total > sum(serving.values()):
        by_model.append(("no model", total - sum(serving.values())))
    pairs = label_counts(conn)
    keys: Counter[str] = Counter()
    for (key, _value), n in pairs.items():
        keys[key] += n
    by_label = []
    for key, n in keys.most_common(label_keys):
        values = sorted(((v, c) for (k, v), c in pairs.items() if k == key), key=lambda x: (-x[1], x[0]))
        by_label.append((key, n, values[:label_values]))
    r = table(Rollout).c
    active = [
        dict(row._mapping)
        for row in conn.execute(
            select(
                r.id,
                r.model_name,
                r.version_number,
                r.selector,
                r.state,
                r.wave_index,
                r.state_since,
                r.created_at,
                r.created_by,
                r.spec["waves"].label("waves"),
            )
            .where(r.state.in_([s.value for s in ACTIVE_STATES] + ["paused", "aborting"]))
            .order_by(r.created_at.desc())
            .limit(10)
        )
    ]
    for row in active:
        row["wave_count"] = len(row.pop("waves") or [])
    return FleetSummary(
        total=total,
        by_status=by_status,
        by_model=by_model,
        by_label=by_label,
        active_rollouts=active,
        recent_audit=audit_entries(conn, limit=10, changes_only=True),
    )


# ----------------------------------------------------------------- devices --


@dataclass
class DevicePage:
    items: list[dict[str, Any]]
    total: int
    offset: int
    limit: int


DEVICE_COLUMNS = (
    "id",
    "status",
    "agent_version",
    "labels",
    "installed",
    "last_seen",
    "status_changed_at",
    "revoked_at",
)


def device_page(
    conn: Connection, *, status: str | None, selector: Selector, q: str | None, offset: int, limit: int
) -> DevicePage:
    """One page of devices, filtered and paginated in SQL, sorted by id; two statements whatever the size."""
    d = table(Device).c
    where: list[ColumnElement[bool]] = [selector_clause(selector)]
    if status:
        where.append(d.status == status)
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append(d.id.like(f"%{escaped}%", escape="\\"))
    total = conn.execute(select(func.count()).select_from(table(Device)).where(*where)).scalar_one()
    rows = conn.execute(
        select(*(d[c] for c in DEVICE_COLUMNS)).where(*where).order_by(d.id).offset(offset).limit(limit)
    ).all()
    items = []
    for row in rows:
        item = dict(row._mapping)
        item["model"] = active_model(item["installed"])
        items.append(item)
    return DevicePage(items, int(total), offset, limit)


@dataclass
class DeviceDetail:
    device: dict[str, Any]
    deployments: list[dict[str, Any]]
    events: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    last_telemetry: dict[str, Any] | None = None
    rollouts: dict[str, str] = field(default_factory=dict)


def device_detail(conn: Connection, device_id: str) -> DeviceDetail | None:
    d = table(Device).c
    row = conn.execute(select(table(Device)).where(d.id == device_id)).first()
    if row is None:
        return None
    t, dep = table(DeploymentTarget).c, table(Deployment).c
    deployments = [
        dict(r._mapping)
        for r in conn.execute(
            select(
                dep.id,
                dep.model_name,
                dep.version_number,
                dep.rollout_id,
                dep.rollout_wave,
                dep.created_by,
                t.variant,
                t.state,
                t.progress,
                t.reason,
                t.started_at,
                t.finished_at,
            )
            .join_from(table(DeploymentTarget), table(Deployment), t.deployment_id == dep.id)
            .where(t.device_id == device_id)
            .order_by(t.started_at.desc(), t.id.desc())
            .limit(25)
        )
    ]
    e = table(DeviceEvent).c
    events = [
        dict(r._mapping)
        for r in conn.execute(
            select(e.received_at, e.type, e.kind, e.message)
            .where(e.device_id == device_id)
            .order_by(e.received_at.desc(), e.id.desc())
            .limit(15)
        )
    ]
    tel = table(TelemetryRecord).c
    last = conn.execute(
        select(
            tel.received_at,
            tel.cpu_percent,
            tel.rss_bytes,
            tel.latency_p50_ms,
            tel.latency_p95_ms,
            tel.latency_p99_ms,
            tel.inference_count,
            tel.inference_errors,
            tel.interval_s,
            tel.model,
            tel.model_version,
            tel.variant,
        )
        .where(tel.device_id == device_id)
        .order_by(tel.received_at.desc(), tel.id.desc())
        .limit(1)
    ).first()
    return DeviceDetail(
        device=dict(row._mapping),
        deployments=deployments,
        events=events,
        audit=audit_entries(conn, target=device_id, limit=10),
        last_telemetry=dict(last._mapping) if last else None,
    )


def telemetry_series(conn: Connection, device_id: str, points: int = 720) -> dict[str, list[Any]]:
    """The device's last ``points`` telemetry rows as columns for the charts (oldest first)."""
    tel = table(TelemetryRecord).c
    tokens = tel.data[("inference", "tokens_per_s")].as_float()
    rows = list(
        reversed(
            conn.execute(
                select(
                    tel.received_at,
                    tel.latency_p50_ms,
                    tel.latency_p95_ms,
                    tel.latency_p99_ms,
                    tel.inference_count,
                    tel.inference_errors,
                    tel.interval_s,
                    tokens.label("tokens_per_s"),
                )
                .where(tel.device_id == device_id)
                .order_by(tel.received_at.desc(), tel.id.desc())
                .limit(points)
            ).all()
        )
    )
    out: dict[str, list[Any]] = {k: [] for k in ("t", "p50", "p95", "p99", "per_s", "errors_per_s", "tokens_per_s")}
    for r in rows:
        interval = r.interval_s or 0.0
        out["t"].append(round(r.received_at.timestamp(), 3))
        out["p50"].append(r.latency_p50_ms)
        out["p95"].append(r.latency_p95_ms)
        out["p99"].append(r.latency_p99_ms)
        out["per_s"].append(round(r.inference_count / interval, 3) if interval else None)
        out["errors_per_s"].append(round(r.inference_errors / interval, 3) if interval else None)
        out["tokens_per_s"].append(r.tokens_per_s)
    return out


# ------------------------------------------------------------------ models --


def models_overview(conn: Connection) -> list[dict[str, Any]]:
    """Every model with its versions and their variants (sizes, quantization, agreement, latency): 3 queries
    and one pass over the devices' installed models to count who serves what."""
    m, v, a = table(Model).c, table(ModelVersion).c, table(Artifact).c
    models = [
        dict(r._mapping, versions=[])
        for r in conn.execute(select(m.id, m.name, m.task, m.description, m.created_at, m.created_by).order_by(m.name))
    ]
    by_id = {x["id"]: x for x in models}
    versions: dict[int, dict[str, Any]] = {}
    for r in conn.execute(
        select(
            v.id,
            v.model_id,
            v.number,
            v.source,
            v.description,
            v.created_at,
            v.created_by,
            v.refused,
            v.lineage,
            v.source_checkpoint,
        ).order_by(v.model_id, v.number.desc())
    ):
        item = dict(r._mapping, variants=[], devices=0)
        versions[item["id"]] = item
        by_id[item["model_id"]]["versions"].append(item)
    method = a.signed_manifest[("manifest", "quantization", "method")].as_string()
    order = {"fp32": 0, "fp16": 1, "int8": 2, "int4": 3}
    for art in conn.execute(
        select(a.id, a.version_id, a.variant, a.size_bytes, a.metrics, method.label("quantization"))
    ):
        versions[art.version_id]["variants"].append(dict(art._mapping, devices=0))
    for item in versions.values():
        item["variants"].sort(key=lambda x: (order.get(x["variant"], 9), x["variant"]))
    serving = model_counts(conn)
    per_version: Counter[tuple[str, int]] = Counter()
    for (name, number, _variant), n in serving.items():
        per_version[(name, number)] += n
    for model in models:
        for version in model["versions"]:
            version["devices"] = per_version.get((model["name"], version["number"]), 0)
            for variant in version["variants"]:
                variant["devices"] = serving.get((model["name"], version["number"], variant["variant"]), 0)
    return models


def model_choices(conn: Connection) -> list[dict[str, Any]]:
    """(model, version, variants) for the rollout form, newest versions first."""
    m, v, a = table(Model).c, table(ModelVersion).c, table(Artifact).c
    variants: dict[int, list[str]] = {}
    for r in conn.execute(select(a.version_id, a.variant)):
        variants.setdefault(r.version_id, []).append(r.variant)
    return [
        {"model": r.name, "task": r.task, "version": r.number, "variants": sorted(variants.get(r.id, []))}
        for r in conn.execute(
            select(v.id, v.number, m.name, m.task)
            .join_from(table(ModelVersion), table(Model), v.model_id == m.id)
            .order_by(m.name, v.number.desc())
        )
    ]


def version_form(conn: Connection, values: dict[str, str]) -> tuple[dict[str, str], dict[str, Any]]:
    """What the deploy and rollout forms offer: model versions (the newest preselected when none was
    chosen), their variants, and label suggestions for the selector."""
    choices = model_choices(conn)
    if not values["ref"] and choices:
        values = {**values, "ref": f"{choices[0]['model']}@{choices[0]['version']}"}
    offered = {
        "choices": choices,
        "variants": sorted({v for c in choices for v in c["variants"]}),
        "suggestions": label_suggestions(conn),
    }
    return values, offered


def label_suggestions(conn: Connection, limit: int = 50) -> list[str]:
    """``key=value`` pairs seen on devices, most common first (for the selector field's suggestions)."""
    return [f"{k}={v}" for (k, v), _ in label_counts(conn).most_common(limit)]


def count_matching(conn: Connection, selector: Selector) -> int:
    return int(
        conn.execute(select(func.count()).select_from(table(Device)).where(selector_clause(selector))).scalar_one()
    )


# ---------------------------------------------------------------- rollouts --


def rollout_page(conn: Connection, *, active_only: bool, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Rollouts newest first, without their per-device assignment (counted in SQL where it can be)."""
    r = table(Rollout).c
    where = r.state.notin_(["completed", "aborted"]) if active_only else true()
    total = conn.execute(select(func.count()).select_from(table(Rollout)).where(where)).scalar_one()
    rows = conn.execute(
        select(
            r.id,
            r.model_name,
            r.version_number,
            r.selector,
            r.state,
            r.wave_index,
            r.state_since,
            r.reason,
            r.created_at,
            r.created_by,
            r.finished_at,
            r.spec["waves"].label("waves"),
            json_object_size(conn, r.assignment).label("devices"),
        )
        .where(where)
        .order_by(r.created_at.desc(), r.id)
        .offset(offset)
        .limit(limit)
    ).all()
    items = []
    ids = [row.id for row in rows]
    counts = _rollout_target_counts(conn, ids)
    for row in rows:
        item = dict(row._mapping)
        item["wave_count"] = len(item.pop("waves") or [])
        item["counts"] = counts.get(row.id, {})
        items.append(item)
    return items, int(total)


def _rollout_target_counts(conn: Connection, rollout_ids: list[str]) -> dict[str, dict[str, int]]:
    """Device states per rollout over all its waves' deployments, in one grouped query."""
    if not rollout_ids:
        return {}
    t, dep = table(DeploymentTarget).c, table(Deployment).c
    out: dict[str, dict[str, int]] = {}
    for row in conn.execute(
        select(dep.rollout_id, t.state, func.count().label("n"))
        .join_from(table(DeploymentTarget), table(Deployment), t.deployment_id == dep.id)
        .where(dep.rollout_id.in_(rollout_ids))
        .group_by(dep.rollout_id, t.state)
    ):
        out.setdefault(row.rollout_id, {})[row.state] = row.n
    return out


def audit_entries(
    conn: Connection, *, target: str | None = None, limit: int = 50, changes_only: bool = False
) -> list[dict[str, Any]]:
    """The newest audit entries (of one target); ``changes_only`` leaves out logins and logouts."""
    a = table(AuditEntry).c
    stmt = select(a.at, a.actor, a.action, a.target, a.detail).order_by(a.at.desc(), a.id.desc()).limit(limit)
    if target is not None:
        stmt = stmt.where(a.target == target)
    if changes_only:
        stmt = stmt.where(a.action.not_like("dashboard.%"))
    entries = [dict(r._mapping) for r in conn.execute(stmt)]
    _with_import_outcomes(conn, entries)
    return entries


def _with_import_outcomes(conn: Connection, entries: list[dict[str, Any]]) -> None:
    """An upload's entry is written when its import starts: add how the import ended (one query, if any)."""
    jobs = {
        str(e["detail"].get("job"))
        for e in entries
        if e["action"] == "model.version.import" and isinstance(e["detail"], dict) and e["detail"].get("job")
    }
    if not jobs:
        return
    j = table(ImportJob).c
    found = {
        r.id: dict(r._mapping)
        for r in conn.execute(select(j.id, j.status, j.error, j.version_number).where(j.id.in_(list(jobs)[:200])))
    }
    for e in entries:
        if e["action"] == "model.version.import" and isinstance(e["detail"], dict):
            e["import"] = found.get(str(e["detail"].get("job")))

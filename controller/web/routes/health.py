"""Fleet health per model version: inference rate, error rate, p50/p95 latency and drift over time."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from controller.health import series
from controller.web import queries
from controller.web.deps import UserDep, runtime_of
from controller.web.render import SECURITY_HEADERS, page

router = APIRouter(include_in_schema=False)
RangeName = Annotated[str, Query(alias="range", pattern="^(" + "|".join(series.RANGES) + ")$")]
ModelName = Annotated[str, Path(max_length=128)]
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.get("/health", response_class=HTMLResponse)
def health(request: Request, who: UserDep) -> Response:
    """Every model version: devices serving it, and what they reported in the last minutes."""
    with runtime_of(request).engine.connect() as conn:
        recent = {(x.model, x.version): x.summary for x in series.recent_by_version(conn)}
        serving = queries.model_counts(conn)
        choices = queries.model_choices(conn)
    devices: dict[tuple[str, int], int] = {}
    for (name, number, _variant), n in serving.items():
        devices[(name, number)] = devices.get((name, number), 0) + n
    tasks = {(c["model"], c["version"]): c["task"] for c in choices}
    # registered versions, and versions devices report serving that this registry does not hold
    keys = sorted(set(tasks) | set(recent) | set(devices))
    rows = [
        {
            "model": m,
            "version": v,
            "task": tasks.get((m, v), ""),
            "devices": devices.get((m, v), 0),
            "recent": recent.get((m, v)),
        }
        for m, v in keys
    ]
    # what is in use first: versions with traffic or devices, then the rest
    rows.sort(key=lambda r: (not (r["recent"] or r["devices"]), r["model"], -r["version"]))
    return page(
        request,
        "health.html",
        {"title": "Health", "nav": "health", "rows": rows, "window_min": int(series.RECENT.total_seconds() // 60)},
    )


@router.get("/health/{model}/{version}", response_class=HTMLResponse)
def version_health(
    request: Request,
    model: ModelName,
    version: VersionNumber,
    who: UserDep,
    range_: RangeName = series.DEFAULT_RANGE,
) -> Response:
    with runtime_of(request).engine.connect() as conn:
        data = series.version_series(conn, model, version, series.RANGES[range_])
        devices = sum(n for (m, v, _x), n in queries.model_counts(conn).items() if m == model and v == version)
    return page(
        request,
        "health_version.html",
        {
            "title": f"Health of {model} v{version}",
            "nav": "health",
            "model": model,
            "number": version,  # not "version": that is the page footer's slmfleet version
            "range": range_,
            "ranges": list(series.RANGES),
            "s": data["summary"],
            "data": data,
            "step_s": data["step_s"],
            "devices": devices,
            "has_data": bool(data["summary"]["reports"]),
            "has_labels": len(data["labels"]["names"]) > 1,
            "has_scores": bool(data["scores"]["edges"]),
        },
    )


@router.get("/health/{model}/{version}/series.json")
def version_health_series(
    request: Request,
    model: ModelName,
    version: VersionNumber,
    who: UserDep,
    range_: RangeName = series.DEFAULT_RANGE,
) -> Response:
    """The columns the charts draw (see ``controller.health.series.version_series``)."""
    with runtime_of(request).engine.connect() as conn:
        data = series.version_series(conn, model, version, series.RANGES[range_])
    return JSONResponse(data, headers={k: v for k, v in SECURITY_HEADERS.items() if k != "Content-Security-Policy"})

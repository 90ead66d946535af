"""Fleet overview, device list, device detail, and revoking a device (admins)."""

from __future__ import annotations

import logging
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlmodel import Session

from controller import audit
from controller.cluster import leases, replicas
from controller.db.types import utcnow
from controller.devices import selectors
from controller.enrollment.service import EnrollmentError
from controller.web import queries
from controller.web.attention import attention
from controller.web.deps import AdminFormDep, UserDep, runtime_of
from controller.web.render import SECURITY_HEADERS, page

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)
PER_PAGE = 50
DONE_MESSAGES = {
    "revoked": "Device revoked: its broker credentials are deleted (it is disconnected) and the controller ignores it.",
    # broker_auth = "none": there are no credentials of its own to delete
    "revoked-none": "Device revoked: the controller ignores it from now on (broker_auth is none: the broker has no"
    " credentials of its own to delete).",
}


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, who: UserDep) -> Response:
    with runtime_of(request).engine.connect() as conn:
        summary = queries.fleet_summary(conn)
        needs = attention(conn)
    runtime = runtime_of(request)
    bridge = runtime.bridge
    cluster = None
    if runtime.owner.clustered:  # several controllers: which replica drives what
        stale_after = runtime.settings.lease_ttl_s * 3
        cluster = {
            "me": runtime.owner.replica_id,
            "replicas": [(r, r.alive(stale_after)) for r in replicas.all_replicas(runtime.engine)],
            "leases": [row for row in leases.all_leases(runtime.engine) if row.live],
        }
    return page(
        request,
        "overview.html",
        {
            "title": "Fleet",
            "nav": "fleet",
            "s": summary,
            "a": needs,
            "broker_connected": bool(bridge and bridge.connected),
            "cluster": cluster,
        },
    )


@router.get("/devices", response_class=HTMLResponse)
def devices(
    request: Request,
    who: UserDep,
    status: Annotated[Literal["", "online", "offline"], Query()] = "",
    selector: Annotated[str, Query(max_length=4096)] = "",
    q: Annotated[str, Query(max_length=128)] = "",
    page_: Annotated[int, Query(alias="page", ge=1, le=1_000_000)] = 1,
) -> Response:
    """Devices filtered by status, label selector and id, paginated in SQL."""
    error = ""
    try:
        parsed = selectors.parse(selector)
    except selectors.SelectorError as exc:
        error, parsed = str(exc), None
    result = None
    if parsed is not None:
        with runtime_of(request).engine.connect() as conn:
            result = queries.device_page(
                conn, status=status or None, selector=parsed, q=q or None, offset=(page_ - 1) * PER_PAGE, limit=PER_PAGE
            )
    filters = {k: v for k, v in (("status", status), ("selector", selector), ("q", q)) if v}
    return page(
        request,
        "devices.html",
        {
            "title": "Devices",
            "nav": "devices",
            "result": result,
            "error": error,
            "filters": filters,
            "status": status,
            "selector": selector,
            "q": q,
            "page": page_,
            "per_page": PER_PAGE,
        },
        status_code=422 if error else 200,
    )


@router.get("/selector/count")
def count_devices(request: Request, who: UserDep, selector: Annotated[str, Query(max_length=4096)] = "") -> Response:
    """How many devices a selector matches now (the rollout form asks as the operator types)."""
    headers = {k: v for k, v in SECURITY_HEADERS.items() if k != "Content-Security-Policy"}
    try:
        parsed = selectors.parse(selector)
    except selectors.SelectorError as exc:
        return JSONResponse({"error": str(exc)}, headers=headers)
    with runtime_of(request).engine.connect() as conn:
        return JSONResponse({"matching": queries.count_matching(conn, parsed)}, headers=headers)


def _device_page(
    request: Request,
    device_id: str,
    *,
    notice: str = "",
    error: str = "",
    retry_revoke: bool = False,
    status_code: int = 200,
) -> Response:
    with runtime_of(request).engine.connect() as conn:
        detail = queries.device_detail(conn, device_id)
    if detail is None:
        return page(request, "error.html", {"title": "Not found", "message": f"No device {device_id!r}."}, 404)
    return page(
        request,
        "device.html",
        {
            "title": f"Device {device_id}",
            "nav": "devices",
            "d": detail.device,
            "detail": detail,
            "model": queries.active_model(detail.device["installed"]),
            "notice": notice,
            "error": error,
            "retry_revoke": retry_revoke,
        },
        status_code=status_code,
    )


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device(request: Request, device_id: str, who: UserDep, done: Annotated[str, Query(max_length=16)] = "") -> Response:
    return _device_page(request, device_id, notice=DONE_MESSAGES.get(done, ""))


@router.post("/devices/{device_id}/revoke")
def revoke_device(
    request: Request,
    device_id: Annotated[str, Path(max_length=128)],
    who: AdminFormDep,
    reason: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """Revoke a device (admins): the same service calls and audit action as ``POST /api/v1/devices/{id}/revoke``."""
    reason = reason.strip()
    if not reason:
        return _device_page(
            request, device_id, error="Give a reason for revoking: it goes into the audit log.", status_code=422
        )
    runtime = runtime_of(request)
    with Session(runtime.engine) as session:
        try:
            changed = runtime.enrollment.mark_revoked(session, device_id)
        except EnrollmentError as exc:
            return _device_page(request, device_id, error=str(exc), status_code=exc.status)
        detail = {"already": not changed, "at": utcnow().isoformat(), "reason": reason, "via": "dashboard"}
        audit.record(session, who.name, "device.revoke", device_id, detail)
        session.commit()
    try:
        # also when it was revoked already: repeats the broker's deletion, as the REST route does
        runtime.enrollment.revoked_committed(device_id)
    except EnrollmentError as exc:
        # revoked in the database, but the broker may still let it in: offer the button once more
        return _device_page(request, device_id, error=str(exc), retry_revoke=True, status_code=exc.status)
    log.info("dashboard: %s revoked device %s", who.name, device_id)
    done = "revoked" if runtime.enrollment.admin is not None else "revoked-none"
    return RedirectResponse(f"/devices/{quote(device_id, safe='')}?done={done}", status_code=303)


@router.get("/devices/{device_id}/series.json")
def device_series(
    request: Request, device_id: str, who: UserDep, points: Annotated[int, Query(ge=10, le=5000)] = 720
) -> Response:
    """Latency and throughput columns for the device's charts."""
    with runtime_of(request).engine.connect() as conn:
        series = queries.telemetry_series(conn, device_id, points)
    return JSONResponse(series, headers={k: v for k, v in SECURITY_HEADERS.items() if k != "Content-Security-Policy"})

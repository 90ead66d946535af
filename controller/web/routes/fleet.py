"""Fleet overview, device list and device detail."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from controller.devices import selectors
from controller.web import queries
from controller.web.deps import UserDep, runtime_of
from controller.web.render import SECURITY_HEADERS, page

router = APIRouter(include_in_schema=False)
PER_PAGE = 50


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, who: UserDep) -> Response:
    with runtime_of(request).engine.connect() as conn:
        summary = queries.fleet_summary(conn)
    bridge = runtime_of(request).bridge
    return page(
        request,
        "overview.html",
        {
            "title": "Fleet",
            "nav": "fleet",
            "s": summary,
            "broker_connected": bool(bridge and bridge.connected),
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


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device(request: Request, device_id: str, who: UserDep) -> Response:
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
        },
    )


@router.get("/devices/{device_id}/series.json")
def device_series(
    request: Request, device_id: str, who: UserDep, points: Annotated[int, Query(ge=10, le=5000)] = 720
) -> Response:
    """Latency and throughput columns for the device's charts."""
    with runtime_of(request).engine.connect() as conn:
        series = queries.telemetry_series(conn, device_id, points)
    return JSONResponse(series, headers={k: v for k, v in SECURITY_HEADERS.items() if k != "Content-Security-Policy"})

"""Devices: list, inspect, label, forget; their telemetry and events."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import Field
from sqlalchemy import func
from sqlmodel import col, select

from controller import audit
from controller.api.deps import OperatorDep, RuntimeDep, SessionDep, ViewerDep
from controller.api.openapi import errors
from controller.api.schemas import (
    CommandSent,
    DeviceConfigure,
    DevicePage,
    DevicePatch,
    DevicePublic,
    EventPublic,
    TelemetryPublic,
)
from controller.db.models import Device, DeviceEvent, TelemetryRecord
from controller.db.types import from_epoch
from controller.devices import selectors
from controller.enrollment.service import EnrollmentError
from wire.messages import Configure

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])

#: the largest offset accepted: larger numbers overflow the database drivers' integers (a 500, not a 422)
MAX_DB_INT = 2**31 - 1


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59-23:00 is past the year 9999 in UTC, 0001-01-01T00:00+14:00 before 1
        return (datetime.max if value.year > 1 else datetime.min).replace(tzinfo=UTC)


def _get(session: SessionDep, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {device_id!r} not found")
    return device


@router.get("", response_model=DevicePage)
def list_devices(
    session: SessionDep,
    _: ViewerDep,
    status_: Annotated[Literal["online", "offline"] | None, Query(alias="status")] = None,
    selector: Annotated[
        Annotated[str, Field(max_length=4096, json_schema_extra={"pattern": selectors.SCHEMA_PATTERN})] | None,
        Query(description="label selector, e.g. site=berlin,tier!=canary,gpu"),
    ] = None,
    label: Annotated[
        list[Annotated[str, Field(json_schema_extra={"pattern": selectors.LABEL_FILTER_PATTERN})]] | None,
        Query(description="KEY=VALUE, repeatable (all must match)"),
    ] = None,
    q: Annotated[str | None, Query(description="substring of the device id", max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_DB_INT)] = 0,
) -> DevicePage:
    """Devices, filtered by status, labels and id, sorted by id, paginated."""
    terms = [selector] if selector else []
    for item in label or []:
        if "=" not in item:
            raise HTTPException(422, f"label filter {item!r}: use KEY=VALUE")
        terms.append(item)
    try:
        parsed = selectors.parse(",".join(terms))
    except selectors.SelectorError as exc:
        raise HTTPException(422, str(exc)) from None
    stmt = select(Device)
    if status_ is not None:
        stmt = stmt.where(Device.status == status_)
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(col(Device.id).like(f"%{escaped}%", escape="\\"))
    stmt = stmt.order_by(col(Device.id))
    if not parsed.terms:
        total = session.exec(select(func.count()).select_from(stmt.subquery())).one()
        items = session.exec(stmt.offset(offset).limit(limit)).all()
    else:  # label selectors are evaluated here, the same way for every database
        matching = [d for d in session.exec(stmt).all() if parsed.matches(d.labels)]
        total, items = len(matching), matching[offset : offset + limit]
    return DevicePage(items=[DevicePublic.model_validate(d) for d in items], total=total, limit=limit, offset=offset)


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, session: SessionDep, _: ViewerDep) -> Device:
    return _get(session, device_id)


@router.patch("/{device_id}", response_model=DevicePublic, responses=errors(409))
def patch_device(device_id: str, body: DevicePatch, session: SessionDep, who: OperatorDep) -> Device:
    """Set labels (a value) or remove them (``null``)."""
    device = _get(session, device_id)
    labels = dict(device.labels)
    for key, value in body.labels.items():
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
    if len(labels) > 64:  # the patch is valid; with the labels the device has, there would be too many
        raise HTTPException(status.HTTP_409_CONFLICT, "a device can carry at most 64 labels: remove some first")
    device.labels = labels
    session.add(device)
    audit.record(session, who.name, "device.labels", device_id, {"patch": body.labels})
    session.commit()
    session.refresh(device)
    return device


@router.delete(
    "/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(_409="the device still has broker credentials: an admin revokes it first"),
)
def delete_device(device_id: str, session: SessionDep, runtime: RuntimeDep, who: OperatorDep) -> Response:
    """Forget a device and its history. It stays forgotten: what it still sends is dropped (counted), and only an
    admin's enrollment token bound to its id brings it back. Refused while it has broker credentials (revoke it)."""
    try:
        tombstone = runtime.enrollment.forget(session, device_id, who.name)
        audit.record(session, who.name, "device.delete", device_id, {"was_enrolled": tombstone.was_enrolled})
        session.commit()
    except EnrollmentError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    except BaseException:
        runtime.enrollment.forget_failed(device_id)
        raise
    runtime.enrollment.forgotten_committed(device_id)
    runtime.registry.forget(device_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{device_id}/telemetry", response_model=list[TelemetryPublic])
def device_telemetry(
    device_id: str,
    session: SessionDep,
    _: ViewerDep,
    since: Annotated[datetime | None, Query(description="ISO 8601 time or Unix seconds; received at or after")] = None,
    until: Annotated[datetime | None, Query(description="received before this time")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> list[TelemetryRecord]:
    """Telemetry rows of a device, oldest first."""
    _get(session, device_id)
    stmt = select(TelemetryRecord).where(TelemetryRecord.device_id == device_id)
    if since is not None:
        stmt = stmt.where(col(TelemetryRecord.received_at) >= _utc(since))
    if until is not None:
        stmt = stmt.where(col(TelemetryRecord.received_at) < _utc(until))
    return list(session.exec(stmt.order_by(col(TelemetryRecord.received_at), col(TelemetryRecord.id)).limit(limit)))


@router.get("/{device_id}/events", response_model=list[EventPublic])
def device_events(
    device_id: str,
    session: SessionDep,
    _: ViewerDep,
    since: Annotated[datetime | None, Query(description="ISO 8601 time or Unix seconds")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> list[DeviceEvent]:
    """Events a device reported, oldest first."""
    _get(session, device_id)
    stmt = select(DeviceEvent).where(DeviceEvent.device_id == device_id)
    if since is not None:
        stmt = stmt.where(col(DeviceEvent.received_at) >= _utc(since))
    return list(session.exec(stmt.order_by(col(DeviceEvent.received_at), col(DeviceEvent.id)).limit(limit)))


@router.post("/{device_id}/configure", response_model=CommandSent, status_code=status.HTTP_202_ACCEPTED)
def configure_device(
    device_id: str, body: DeviceConfigure, session: SessionDep, runtime: RuntimeDep, who: OperatorDep
) -> CommandSent:
    """Change a device's agent settings: a Configure command signed for this device alone, valid for
    ``command_ttl_s``. The device acknowledges it in its events and announces the new interval in its state."""
    device = _get(session, device_id)
    if device.revoked_at is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"device {device_id!r} is revoked")
    if not body.model_fields_set:
        raise HTTPException(422, "nothing to change: give at least one setting (telemetry_interval_s)")
    bridge = runtime.bridge
    if bridge is None or not bridge.connected:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the controller is not connected to the broker")
    command_id = f"configure-{uuid.uuid4().hex[:16]}"
    now = time.time()
    runtime.commands.send(
        device_id, Configure(ts=now, command_id=command_id, telemetry_interval_s=body.telemetry_interval_s)
    )
    audit.record(session, who.name, "device.configure", device_id, body.model_dump(exclude_unset=True))
    session.commit()
    return CommandSent(command_id=command_id, expires_at=from_epoch(now + runtime.commands.ttl_s))

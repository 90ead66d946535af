"""Device enrollment: admins create single-use tokens; a device exchanges one for its identity and credentials.

``POST /api/v1/enroll`` takes no operator token: the enrollment token in the
body is the credential. Revoking a device (``POST /api/v1/devices/{id}/revoke``)
deletes its broker credentials and makes the controller ignore it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from controller import audit
from controller.api.deps import AdminDep, RuntimeDep, SessionDep
from controller.api.openapi import errors
from controller.api.ratelimit import ApiLimits, retry_after
from controller.db.models import EnrollmentToken
from controller.db.types import utcnow
from controller.enrollment import tokens
from controller.enrollment.schemas import DeviceIdStr, EnrollmentTokenCreate, controller_url, enroll_command
from controller.enrollment.service import EnrollmentError
from controller.pki.authority import PkiError, check_csr

router = APIRouter(prefix="/api/v1", tags=["enrollment"])

TokenId = Annotated[int, Path(ge=1, le=2**31 - 1, description="the enrollment token's id (from the list)")]


class EnrollmentTokenPublic(BaseModel):
    id: int
    prefix: str
    note: str
    labels: dict[str, str]
    device_id: str | None
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    used_at: datetime | None
    used_by: str | None
    usable: bool = Field(description="neither used, revoked nor expired")


class EnrollmentTokenCreated(EnrollmentTokenPublic):
    token: str = Field(description="the secret: shown this once, only its hash is kept")
    controller_url: str = Field(description="the controller's URL for devices (public_url, else this request's)")
    enroll_command: str = Field(description="what to run on the device, with the token saved in TOKEN_FILE")


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    device_id: DeviceIdStr | None = Field(None, description="the id this device would like; omit: one is chosen")
    csr_pem: Annotated[str, StringConstraints(max_length=8192)] | None = Field(
        None,
        description="a PEM certificate request for the device's own key: needed when the controller issues client"
        " certificates (device_certificates), ignored otherwise",
    )


class EnrollResponse(BaseModel):
    device_id: str
    broker_url: str
    mqtt_username: str | None = Field(description="null: the broker takes no per-device credentials")
    mqtt_password: str | None
    signing_public_key_pem: str = Field(description="pin it: manifests must be signed with its private half")
    broker_ca_pem: str | None = Field(description="CA that verifies the broker's TLS certificate, if configured")
    labels: dict[str, str]
    client_cert_pem: str | None = Field(
        None, description="the device's client certificate for the broker (mutual TLS), for the key of csr_pem"
    )


class RevokeResult(BaseModel):
    device_id: str
    revoked: bool = True
    changed: bool = Field(description="false when it was already revoked")


def _public(row: EnrollmentToken) -> EnrollmentTokenPublic:
    assert row.id is not None
    return EnrollmentTokenPublic(
        id=row.id,
        prefix=row.prefix,
        note=row.note,
        labels=row.labels,
        device_id=row.device_id,
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        used_at=row.used_at,
        used_by=row.used_by,
        usable=tokens.unusable_reason(row) is None,
    )


@router.get("/enrollment-tokens", response_model=list[EnrollmentTokenPublic])
def list_enrollment_tokens(session: SessionDep, _: AdminDep) -> list[EnrollmentTokenPublic]:
    """Every enrollment token, used, revoked and expired ones included; never a secret."""
    return [_public(row) for row in tokens.list_all(session)]


@router.post("/enrollment-tokens", response_model=EnrollmentTokenCreated, status_code=status.HTTP_201_CREATED)
def create_enrollment_token(
    body: EnrollmentTokenCreate, request: Request, session: SessionDep, runtime: RuntimeDep, who: AdminDep
) -> EnrollmentTokenCreated:
    """Create a single-use enrollment token; the answer carries the secret, which cannot be read again."""
    lifetime = body.lifetime(runtime.settings.enrollment_token_hours)
    secret, row = tokens.create(session, who.name, lifetime, body.labels, body.device_id, body.note)
    audit.record(
        session,
        who.name,
        "enrollment_token.create",
        row.prefix,
        {"id": row.id, "labels": body.labels, "device_id": body.device_id, "expires_at": row.expires_at.isoformat()},
    )
    session.commit()
    session.refresh(row)
    url = controller_url(runtime.settings.public_url, str(request.base_url))
    return EnrollmentTokenCreated(
        **_public(row).model_dump(),
        token=secret,
        controller_url=url,
        enroll_command=enroll_command(url),
    )


@router.delete("/enrollment-tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_enrollment_token(token_id: TokenId, session: SessionDep, who: AdminDep) -> Response:
    """Revoke an enrollment token so nobody can use it. Revoking twice is harmless."""
    row = session.get(EnrollmentToken, token_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"enrollment token {token_id} not found")
    changed = tokens.revoke(session, row)
    audit.record(session, who.name, "enrollment_token.revoke", row.prefix, {"id": token_id, "already": not changed})
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/enroll",
    response_model=EnrollResponse,
    responses=errors(
        _401="unknown enrollment token",
        _403="the enrollment token was used, revoked or has expired",
        _409="the device id is taken, revoked or forgotten, or the token is bound to another id",
        _503="no broker to hand out, or the broker did not create the device's credentials",
    ),
)
def enroll(body: EnrollRequest, request: Request, session: SessionDep, runtime: RuntimeDep) -> EnrollResponse:
    """Exchange an enrollment token for this device's identity, broker credentials and the signing key."""
    limits: ApiLimits = request.app.state.api_limits
    wait, why = limits.check_enrollment_token(body.token, request.client.host if request.client else "unknown")
    if wait:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, why, headers={"Retry-After": str(retry_after(wait))})
    pki = runtime.pki
    if pki is not None:  # checked before the token is used up
        if not body.csr_pem:
            raise HTTPException(
                422,
                "this controller gives devices client certificates: send a certificate request (csr_pem);"
                " 'slmfleet agent enroll' does",
            )
        try:
            check_csr(body.csr_pem)
        except PkiError as exc:
            raise HTTPException(422, str(exc)) from None
    try:
        result = runtime.enrollment.enroll(session, body.token, body.device_id)
    except EnrollmentError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    issued = pki.issue(session, result.device_id, body.csr_pem) if pki is not None and body.csr_pem else None
    audit.record(
        session,
        f"enrollment:{result.token_prefix}",
        "device.enroll",
        result.device_id,
        {
            "token_id": result.token_id,
            "labels": result.labels,
            "broker_credentials": result.mqtt_password is not None,
            **({"restored": result.restored} if result.restored else {}),
            "client_certificate": issued.serial if issued is not None else None,
        },
    )
    session.commit()
    if pki is not None and issued is not None:  # enrolled again: the certificates of earlier enrollments stop working
        pki.installed(result.device_id, issued.serial)
    return EnrollResponse(
        device_id=result.device_id,
        broker_url=result.broker_url,
        # with a certificate the broker takes the user name from it: no password to hand out
        mqtt_username=result.mqtt_username if issued is None else None,
        mqtt_password=result.mqtt_password if issued is None else None,
        signing_public_key_pem=result.signing_public_key_pem,
        broker_ca_pem=result.broker_ca_pem,
        labels=result.labels,
        client_cert_pem=issued.cert_pem if issued is not None else None,
    )


@router.post("/devices/{device_id}/revoke", response_model=RevokeResult, tags=["devices"], responses=errors(503))
def revoke_device(
    device_id: Annotated[str, Path(max_length=128)], session: SessionDep, runtime: RuntimeDep, who: AdminDep
) -> RevokeResult:
    """Revoke a device: its broker credentials are deleted (it is disconnected) and the controller ignores it."""
    try:
        changed = runtime.enrollment.mark_revoked(session, device_id)
    except EnrollmentError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    audit.record(session, who.name, "device.revoke", device_id, {"already": not changed, "at": utcnow().isoformat()})
    session.commit()
    try:
        runtime.enrollment.revoked_committed(device_id)
    except EnrollmentError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return RevokeResult(device_id=device_id, changed=changed)

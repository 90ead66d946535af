"""Enroll a device (token in, identity and credentials out) and revoke one.

Enrollment claims the token first (single use, even under concurrent
requests), then creates the device's broker client and ACL role, then records
the device; if the broker step fails the claim is released so the token can be
tried again. Revocation marks the device revoked (the controller ignores it
from then on) and deletes its broker client (the broker disconnects it at once
and refuses it afterwards).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from agent.protocol import topics
from controller.broker.dynsec import DynsecAdmin, DynsecError
from controller.db.models import Device
from controller.db.types import utcnow
from controller.enrollment import tokens

log = logging.getLogger(__name__)


class EnrollmentError(Exception):
    """Enrollment or revocation refused; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Enrollment:
    """What a device receives: who it is, where to connect, with what, and whom to trust."""

    device_id: str
    broker_url: str
    mqtt_username: str | None
    mqtt_password: str | None
    signing_public_key_pem: str
    broker_ca_pem: str | None
    labels: dict[str, str] = field(default_factory=dict)
    token_id: int | None = None
    token_prefix: str = ""


class EnrollmentService:
    def __init__(
        self,
        engine: Engine,
        broker_url: Callable[[], str | None],
        signing_public_key_pem: str,
        broker_ca_file: Path | None,
        admin: DynsecAdmin | None,
        on_revoked_changed: Callable[[frozenset[str]], None],
    ) -> None:
        self.engine = engine
        self._broker_url = broker_url
        self.public_pem = signing_public_key_pem
        self.broker_ca_file = broker_ca_file
        self.admin = admin
        self._on_revoked_changed = on_revoked_changed
        self.revoked: frozenset[str] = frozenset()

    def load(self) -> None:
        """Read the revoked devices from the database (at start)."""
        with Session(self.engine) as session:
            ids = session.exec(select(Device.id).where(col(Device.revoked_at).is_not(None))).all()
        self._set_revoked(frozenset(ids))

    def _set_revoked(self, revoked: frozenset[str]) -> None:
        self.revoked = revoked
        self._on_revoked_changed(revoked)

    # ------------------------------------------------------------ enroll --

    def enroll(self, session: Session, secret: str, proposed_id: str | None) -> Enrollment:
        """Claim the token, create the broker credentials and add the device to ``session``.

        The claim is committed here (single use); the device row is left for the
        caller to commit together with its audit entry.
        """
        broker_url = self._broker_url()
        if not broker_url:
            raise EnrollmentError("this controller has no broker to hand out (broker_url is unset)", 503)
        row = tokens.find(session, secret)
        if row is None:
            raise EnrollmentError("unknown enrollment token", 401)
        reason = tokens.unusable_reason(row)
        if reason is not None:
            raise EnrollmentError(reason, 403)
        device_id = self._choose_id(row.device_id, proposed_id)
        existing = session.get(Device, device_id)
        live = existing is not None and existing.enrolled_at is not None and existing.revoked_at is None
        if live and row.device_id != device_id:
            raise EnrollmentError(
                f"device {device_id} is already enrolled: revoke it first, or create a token bound to it"
                " (--device-id) to give it new credentials",
                409,
            )
        if not tokens.claim(session, row, device_id):
            raise EnrollmentError("the enrollment token was already used", 403)
        password = None
        if self.admin is not None:
            password = secrets.token_urlsafe(32)
            try:
                self.admin.ensure_device(device_id, password)
            except DynsecError as exc:
                tokens.release(session, row)
                raise EnrollmentError(f"the broker did not create the device's credentials: {exc}", 503) from None
        device = session.get(Device, device_id) or Device(id=device_id)
        device.labels = {**device.labels, **row.labels}
        device.enrolled_at = utcnow()
        device.revoked_at = None
        session.add(device)
        if device_id in self.revoked:
            self._set_revoked(self.revoked - {device_id})
        log.info("device %s enrolled (token %s)", device_id, row.prefix)
        return Enrollment(
            device_id=device_id,
            broker_url=broker_url,
            mqtt_username=device_id if password is not None else None,
            mqtt_password=password,
            signing_public_key_pem=self.public_pem,
            broker_ca_pem=self.broker_ca_file.read_text() if self.broker_ca_file is not None else None,
            labels=dict(device.labels),
            token_id=row.id,
            token_prefix=row.prefix,
        )

    @staticmethod
    def _choose_id(bound: str | None, proposed: str | None) -> str:
        if bound is not None and proposed is not None and proposed != bound:
            raise EnrollmentError(f"this enrollment token is bound to device {bound}, not {proposed}", 409)
        device_id = bound or proposed or f"dev-{secrets.token_hex(6)}"
        if not topics.is_valid_id(device_id):
            raise EnrollmentError(
                f"invalid device id {device_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ : -", 422
            )
        return device_id

    # ------------------------------------------------------------ revoke --

    def mark_revoked(self, session: Session, device_id: str) -> bool:
        """Mark a device revoked in ``session`` (the caller commits); False when it already was."""
        device = session.get(Device, device_id)
        if device is None:
            raise EnrollmentError(f"device {device_id} not found", 404)
        if device.revoked_at is not None:
            return False
        now = utcnow()
        device.revoked_at = now
        device.status = "offline"
        device.offline_reason = "revoked"
        device.status_changed_at = now
        session.add(device)
        return True

    def revoked_committed(self, device_id: str) -> None:
        """After the revocation is committed: ignore the device from now on and delete its broker client."""
        self._set_revoked(self.revoked | {device_id})
        if self.admin is not None:
            try:
                self.admin.remove_device(device_id)
            except DynsecError as exc:
                raise EnrollmentError(
                    f"device {device_id} is revoked in the controller, but the broker did not confirm removing"
                    f" its credentials ({exc}); repeat the revocation",
                    503,
                ) from None
        log.info("device %s revoked", device_id)

"""Enroll a device (token in, identity and credentials out), revoke one, forget one.

Enrollment claims the token first (single use, even under concurrent
requests), then creates the device's broker client and ACL role, then records
the device; if the broker step fails the claim is released so the token can be
tried again. Revocation marks the device revoked (the controller ignores it
from then on) and deletes its broker client (the broker disconnects it at once
and refuses it afterwards). Forgetting deletes the device and its history and
leaves a tombstone: what it still sends is ignored.

A revoked or forgotten id comes back only by an admin's explicit act: an
enrollment token bound to that id and created after the revocation or the
forgetting. Any other token, unbound or older, is refused (409), so whoever
holds a spare token cannot take the id over with its labels and history.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller.broker.dynsec import DynsecAdmin, DynsecError
from controller.db.models import Device, DeviceEvent, ForgottenDevice, TelemetryRecord, table
from controller.db.types import utcnow
from controller.enrollment import tokens
from wire import topics

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
    #: "revoked" or "forgotten" when this enrollment brought a barred id back
    restored: str | None = None


class EnrollmentService:
    def __init__(
        self,
        engine: Engine,
        broker_url: Callable[[], str | None],
        signing_public_key_pem: str,
        broker_ca_file: Path | None,
        admin: DynsecAdmin | None,
        on_barred_changed: Callable[[frozenset[str], frozenset[str]], None],
        drain: Callable[[], object] | None = None,
    ) -> None:
        self.engine = engine
        self._broker_url = broker_url
        self.public_pem = signing_public_key_pem
        self.broker_ca_file = broker_ca_file
        self.admin = admin
        self._on_barred_changed = on_barred_changed
        self.revoked: frozenset[str] = frozenset()
        self.forgotten: frozenset[str] = frozenset()
        #: waits until what was received before the call is written (the ingest writer's flush)
        self.drain = drain

    def load(self) -> None:
        """Read the revoked and the forgotten devices from the database (at start)."""
        with Session(self.engine) as session:
            revoked = session.exec(select(Device.id).where(col(Device.revoked_at).is_not(None))).all()
            forgotten = session.exec(select(ForgottenDevice.device_id)).all()
        self._set_barred(frozenset(revoked), frozenset(forgotten))

    def _set_barred(self, revoked: frozenset[str], forgotten: frozenset[str]) -> None:
        self.revoked, self.forgotten = revoked, forgotten
        self._on_barred_changed(revoked, forgotten)

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
        tombstone = session.get(ForgottenDevice, device_id)
        barred = _barred(existing, tombstone)
        if barred is not None:
            what, since = barred
            if row.device_id != device_id or row.created_at <= since:
                raise EnrollmentError(
                    f"device {device_id} was {what} at {since:%Y-%m-%d %H:%M:%S} UTC: only an admin brings it back,"
                    f" with an enrollment token bound to it and created since"
                    f" (slmfleet enrollment create --device-id {device_id})",
                    409,
                )
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
        if tombstone is not None:
            session.delete(tombstone)
        if device_id in self.revoked or device_id in self.forgotten:
            self._set_barred(self.revoked - {device_id}, self.forgotten - {device_id})
        restored = barred[0] if barred is not None else None
        log.info(
            "device %s enrolled (token %s)%s", device_id, row.prefix, f", no longer {restored}" if restored else ""
        )
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
            restored=restored,
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
        tokens.revoke_bound(session, device_id)
        return True

    def revoked_committed(self, device_id: str) -> None:
        """After the revocation is committed: ignore the device from now on and delete its broker client."""
        self._set_barred(self.revoked | {device_id}, self.forgotten)
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

    # ------------------------------------------------------------ forget --

    def has_credentials(self, device: Device) -> bool:
        """Whether the broker still lets ``device`` in with credentials of its own (dynsec, enrolled, not revoked)."""
        return self.admin is not None and device.enrolled_at is not None and device.revoked_at is None

    def forget(self, session: Session, device_id: str, actor: str) -> ForgottenDevice:
        """Delete a device and its history in ``session`` and leave a tombstone (the caller commits).

        Refused (409) while the device has broker credentials: forgetting would leave them working, and
        only an admin revokes them. A revoked device, or one on a broker without per-device credentials,
        is forgotten.
        """
        device = session.get(Device, device_id)
        if device is None:
            raise EnrollmentError(f"device {device_id} not found", 404)
        if self.has_credentials(device):
            raise EnrollmentError(
                f"device {device_id} still has broker credentials: an admin revokes it first"
                f" (slmfleet devices revoke {device_id}), then it can be forgotten",
                409,
            )
        # ignored from now on, and what it sent before is written first: nothing of it lands after the delete
        self._set_barred(self.revoked, self.forgotten | {device_id})
        if self.drain is not None:
            self.drain()
        for model in (TelemetryRecord, DeviceEvent):
            session.execute(delete(table(model)).where(table(model).c.device_id == device_id))
        session.delete(device)
        tombstone = session.get(ForgottenDevice, device_id) or ForgottenDevice(device_id=device_id)
        tombstone.forgotten_at = utcnow()
        tombstone.forgotten_by = actor
        tombstone.was_enrolled = device.enrolled_at is not None
        session.add(tombstone)
        tokens.revoke_bound(session, device_id)
        return tombstone

    def forgotten_committed(self, device_id: str) -> None:
        """After the forgetting is committed: whatever the device still sends is dropped from now on."""
        self._set_barred(self.revoked - {device_id}, self.forgotten | {device_id})
        log.info("device %s forgotten: what it still sends is dropped", device_id)

    def forget_failed(self, device_id: str) -> None:
        """The forgetting was not committed: the device is heard again."""
        if device_id in self.forgotten:
            with Session(self.engine) as session:
                if session.get(ForgottenDevice, device_id) is not None:
                    return  # forgotten before: it stays so
            self._set_barred(self.revoked, self.forgotten - {device_id})


def _barred(device: Device | None, tombstone: ForgottenDevice | None) -> tuple[str, datetime] | None:
    """Why an id may only come back with a fresh bound token, and since when: ("revoked"|"forgotten", time)."""
    if tombstone is not None:
        return "forgotten", tombstone.forgotten_at
    if device is not None and device.revoked_at is not None:
        return "revoked", device.revoked_at
    return None

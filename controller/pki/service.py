"""Device certificates: issued at enrollment, renewed over MQTT before they expire, revoked through a CRL.

* **Enrollment**: the device sends a certificate request with ``POST /api/v1/enroll`` (its key never leaves
  it); the controller issues a certificate for the enrolled id, valid ``device_cert_hours``.
* **Renewal**: once a third of its lifetime is left the agent sends a CertificateRequest on its events topic,
  signed with its current key; the controller checks that proof against the current certificate on record,
  issues a new one and sends it in a ``certificate`` command sealed for the device. When the device
  acknowledges it, the certificates it replaced are revoked ("superseded").
* **Revocation**: revoking a device revokes its certificates. The CRL (``device_crl_file``, also
  ``GET /api/v1/pki/crl``) is written again on every change and every ``CRL_REFRESH`` (it is valid for
  ``CRL_VALID``: a broker refuses every client once its CRL has expired), then the broker is told to reload
  it: the embedded mosquitto by SIGHUP, another broker by ``broker_reload_command``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import shlex
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller import audit
from controller.db.models import Device, DeviceCertificate
from controller.db.types import utcnow
from controller.pki.authority import Authority, PkiError, check_csr, pem, verify_with, write_public
from wire import signing
from wire.messages import CertificateRequest

log = logging.getLogger(__name__)

CRL_FILE = "devices.crl.pem"
#: how long a CRL is valid, and how often it is issued again (well before it expires)
CRL_VALID = dt.timedelta(days=7)
CRL_REFRESH = dt.timedelta(hours=6)
#: a renewal proof older or newer than this is refused (a replayed request)
PROOF_WINDOW_S = 600.0
#: renewals per device, at most one per this interval (a device asking again and again gets the last one)
RENEW_MIN_INTERVAL_S = 30.0
CONTROLLER_ACTOR = "controller"


@dataclass(frozen=True)
class Issued:
    serial: str
    cert_pem: str
    not_after: dt.datetime


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


class DevicePki:
    def __init__(
        self,
        engine: Engine,
        authority: Authority,
        crl_file: Path,
        valid: dt.timedelta,
        reload_command: str | None = None,
        reload_broker: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.authority = authority
        self.crl_file = crl_file
        self.valid = valid
        self.reload_command = reload_command
        #: tells the embedded broker to reload the CRL (SIGHUP)
        self.reload_broker = reload_broker
        self._lock = threading.Lock()
        self._renewed_at: dict[str, float] = {}

    # ------------------------------------------------------------- issuing --

    def issue(self, session: Session, device_id: str, csr_pem: str, via: str = "enrollment") -> Issued:
        """A certificate for ``device_id`` and the key of ``csr_pem``, added to ``session`` (the caller commits)."""
        csr = check_csr(csr_pem)
        cert = self.authority.issue_client(device_id, csr.public_key(), self.valid)
        chain = pem(cert) + ("" if self.authority.own else self.authority.cert_pem)
        session.add(
            DeviceCertificate(
                device_id=device_id,
                serial=serial_hex(cert),
                cert_pem=chain,
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                via=via,
            )
        )
        log.info(
            "issued client certificate %s to %s (%s, valid until %s)",
            serial_hex(cert),
            device_id,
            via,
            cert.not_valid_after_utc.isoformat(),
        )
        return Issued(serial_hex(cert), chain, cert.not_valid_after_utc)

    def renew(self, device_id: str, request: CertificateRequest, now: float) -> Issued:
        """A renewal the device proved with its current key; PkiError saying why not otherwise."""
        if abs(now - request.ts) > PROOF_WINDOW_S:
            raise PkiError(f"the renewal request was made {now - request.ts:+.0f} s from now: too old or too new")
        with self._lock:
            last = self._renewed_at.get(device_id)
            if last is not None and now - last < RENEW_MIN_INTERVAL_S:
                raise PkiError(f"a certificate was issued to {device_id} {now - last:.0f} s ago; not again so soon")
        with Session(self.engine) as session:
            device = session.get(Device, device_id)
            if device is None or device.revoked_at is not None:
                raise PkiError(f"device {device_id} is revoked or unknown")
            current = session.exec(
                select(DeviceCertificate).where(
                    DeviceCertificate.device_id == device_id,
                    DeviceCertificate.serial == request.serial,
                    col(DeviceCertificate.revoked_at).is_(None),
                )
            ).first()
            if current is None:
                raise PkiError(f"certificate {request.serial} is not a valid certificate of {device_id}")
            if current.not_after <= utcnow():
                raise PkiError(f"certificate {request.serial} has expired: the device must enroll again")
            try:
                proof = base64.b64decode(request.proof, validate=True)
            except (binascii.Error, ValueError):
                raise PkiError("the renewal proof is not base64") from None
            signed = signing.cert_request_bytes(device_id, request.csr_pem, request.serial, request.ts)
            cert = x509.load_pem_x509_certificates(current.cert_pem.encode())[0]
            if not verify_with(cert, proof, signed):
                raise PkiError("the renewal proof does not verify with the current certificate's key")
            issued = self.issue(session, device_id, request.csr_pem, via="renewal")
            audit.record(
                session,
                CONTROLLER_ACTOR,
                "device.certificate.renew",
                device_id,
                {"serial": issued.serial, "replaces": request.serial, "not_after": issued.not_after.isoformat()},
            )
            session.commit()
        with self._lock:
            self._renewed_at[device_id] = now
        return issued

    def installed(self, device_id: str, serial: str) -> int:
        """The device acknowledged certificate ``serial``: revoke the ones it replaced. Returns how many."""
        with Session(self.engine) as session:
            new = session.exec(select(DeviceCertificate).where(DeviceCertificate.serial == serial)).first()
            if new is None or new.device_id != device_id:
                return 0
            older = session.exec(
                select(DeviceCertificate).where(
                    DeviceCertificate.device_id == device_id,
                    col(DeviceCertificate.revoked_at).is_(None),
                    col(DeviceCertificate.issued_at) < new.issued_at,
                )
            ).all()
            for row in older:
                row.revoked_at, row.revoke_reason = utcnow(), "superseded"
                session.add(row)
            session.commit()
        if older:
            self.publish_crl()
        return len(older)

    # ---------------------------------------------------------- revocation --

    def revoke_device(self, device_id: str) -> int:
        """Revoke every certificate of ``device_id``, publish the CRL and have the broker reload it."""
        with Session(self.engine) as session:
            rows = session.exec(
                select(DeviceCertificate).where(
                    DeviceCertificate.device_id == device_id, col(DeviceCertificate.revoked_at).is_(None)
                )
            ).all()
            for row in rows:
                row.revoked_at, row.revoke_reason = utcnow(), "revoked"
                session.add(row)
            session.commit()
        self.publish_crl()
        if rows:
            log.info("revoked %d client certificates of %s", len(rows), device_id)
        return len(rows)

    def crl_pem(self) -> bytes:
        """The current CRL: every revoked certificate that has not expired yet."""
        with Session(self.engine) as session:
            rows = session.exec(
                select(DeviceCertificate).where(
                    col(DeviceCertificate.revoked_at).is_not(None), col(DeviceCertificate.not_after) > utcnow()
                )
            ).all()
            revoked = [(int(r.serial, 16), r.revoked_at) for r in rows if r.revoked_at is not None]
        return self.authority.crl(revoked, CRL_VALID)

    def publish_crl(self) -> None:
        """Write the CRL and have the broker reload it (scheduler, revocations, renewals)."""
        write_public(self.crl_file, self.crl_pem())
        if self.reload_broker is not None:
            self.reload_broker()
        if self.reload_command:
            try:
                subprocess.run(shlex.split(self.reload_command), check=True, timeout=30, capture_output=True)
            except (OSError, subprocess.SubprocessError) as exc:
                log.error(
                    "broker_reload_command %r failed: %s; the broker may use an old CRL", self.reload_command, exc
                )


def empty_crl_if_missing(authority: Authority, path: Path) -> None:
    """A broker configured with a CRL file needs one before it starts; the runtime writes the real one."""
    if not path.is_file():
        write_public(path, authority.crl([], CRL_VALID))

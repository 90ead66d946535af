"""The agent's client certificate for the broker (mutual TLS): which one to use, and renewing it in time.

The certificate and key ``slmfleet agent enroll`` wrote (``mqtt_cert_file``/``mqtt_key_file``, or the
systemd credentials ``mqtt-client-cert``/``mqtt-client-key``) may sit in a read-only place; renewed ones
go to ``data_dir/tls`` (0700; keys 0600): ``client-<serial>.pem``/``.key`` and ``current`` naming the
pair in use, replaced atomically. Whichever valid pair lasts longer is used.

Renewal: once less than a third of the certificate's lifetime is left, the agent makes a new key (kept
as ``pending.key`` across restarts), and sends a CertificateRequest signed with the current key; the
controller answers with a signed ``certificate`` command for that key. The agent installs it and
reconnects with it (a clean reconnect: spooled messages wait a moment, nothing is lost, inference goes
on). Requests are repeated every ``retry_s`` until one is answered.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from agent.deploy.fsutil import atomic_write
from wire import signing
from wire.messages import CertificateRequest, InstallCertificate

log = logging.getLogger(__name__)

PENDING_KEY = "pending.key"
CURRENT = "current"
#: renewal starts when less than this share of the lifetime is left
RENEW_WHEN_LEFT = 1 / 3
#: an unanswered request is repeated after this long at most (sooner for short-lived certificates)
RETRY_S = 600.0


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_csr(device_id: str, key: ec.EllipticCurvePrivateKey) -> str:
    """A certificate request for ``key``; the controller sets the subject to the enrolled device id anyway."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _sign(key: PrivateKeyTypes, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, PKCS1v15(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    raise ValueError(f"a {type(key).__name__} cannot sign a certificate request")


def _public_der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


class ClientIdentity:
    """Implements ``agent.core.CertificateHooks`` over the files described in the module docstring."""

    def __init__(self, device_id: str, cert_file: Path, key_file: Path, state_dir: Path) -> None:
        self.device_id = device_id
        self.configured = (Path(cert_file), Path(key_file))
        self.dir = Path(state_dir)
        self._asked_at: float | None = None

    # --------------------------------------------------------------- files --

    def files(self) -> tuple[Path, Path]:
        """The certificate and key to connect with: the renewed pair if it lasts longer than the configured one."""
        renewed = self._renewed()
        if renewed is None:
            return self.configured
        cert = _load_cert(self.configured[0])
        mine = _load_cert(renewed[0])
        if mine is not None and (cert is None or mine.not_valid_after_utc >= cert.not_valid_after_utc):
            return renewed
        return self.configured

    def _renewed(self) -> tuple[Path, Path] | None:
        try:
            serial = (self.dir / CURRENT).read_text().strip()
        except OSError:
            return None
        pair = (self.dir / f"client-{serial}.pem", self.dir / f"client-{serial}.key")
        return pair if pair[0].is_file() and pair[1].is_file() else None

    def certificate(self) -> x509.Certificate | None:
        return _load_cert(self.files()[0])

    # ------------------------------------------------------------- renewal --

    def _retry_s(self, cert: x509.Certificate) -> float:
        lifetime = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
        return max(1.0, min(RETRY_S, lifetime / 12))

    def _due_at(self, cert: x509.Certificate) -> float:
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        return (cert.not_valid_after_utc - lifetime * RENEW_WHEN_LEFT).timestamp()

    def renewal(self, now: float) -> CertificateRequest | None:
        cert = self.certificate()
        if cert is None or now < self._due_at(cert):
            return None
        if self._asked_at is not None and now - self._asked_at < self._retry_s(cert):
            return None
        self._asked_at = now
        try:
            current_key = serialization.load_pem_private_key(self.files()[1].read_bytes(), password=None)
            pending = self._pending_key()
            csr = make_csr(self.device_id, pending)
            serial = format(cert.serial_number, "x")
            proof = _sign(current_key, signing.cert_request_bytes(self.device_id, csr, serial, now))
        except (OSError, ValueError, TypeError) as exc:
            log.error("cannot ask for a new client certificate: %s", exc)
            return None
        left = cert.not_valid_after_utc.timestamp() - now
        log.info("client certificate %s expires in %.0f s: asking the controller for a new one", serial, left)
        return CertificateRequest(ts=now, seq=0, csr_pem=csr, serial=serial, proof=base64.b64encode(proof).decode())

    def next_wakeup(self) -> float | None:
        cert = self.certificate()
        if cert is None:
            return None
        due = self._due_at(cert)
        if self._asked_at is not None:
            due = max(due, self._asked_at + self._retry_s(cert))
        return due

    def _pending_key(self) -> ec.EllipticCurvePrivateKey:
        """The key of the renewal in progress (the same across restarts, so an answer to an earlier request fits)."""
        path = self.dir / PENDING_KEY
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if isinstance(key, ec.EllipticCurvePrivateKey):
                return key
        except (OSError, ValueError, TypeError):
            pass
        key = new_key()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, key_pem(key))
        return key

    def install(self, command: InstallCertificate, now: float) -> str | None:
        try:
            chain = x509.load_pem_x509_certificates(command.cert_pem.encode())
        except ValueError as exc:
            return f"not a PEM certificate: {exc}"
        leaf = chain[0]
        try:
            pending = serialization.load_pem_private_key((self.dir / PENDING_KEY).read_bytes(), password=None)
        except (OSError, ValueError, TypeError):
            return "no renewal is pending on this device"
        if _public_der(leaf.public_key()) != _public_der(pending.public_key()):
            return "the certificate is not for the key this device asked with"
        names = [str(n.value) for n in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [self.device_id]:
            return f"the certificate names {', '.join(names) or 'nobody'}, not {self.device_id}"
        if leaf.not_valid_after_utc <= dt.datetime.fromtimestamp(now, dt.UTC):
            return "the certificate has expired already"
        serial = format(leaf.serial_number, "x")
        # key and certificate first, then the pointer: a crash leaves the old pair in use or the new one complete
        atomic_write(self.dir / f"client-{serial}.key", key_pem(pending))
        atomic_write(self.dir / f"client-{serial}.pem", command.cert_pem.encode(), 0o644)
        previous = self._renewed()
        atomic_write(self.dir / CURRENT, serial.encode(), 0o644)
        (self.dir / PENDING_KEY).unlink(missing_ok=True)
        self._asked_at = None
        for stale in self.dir.glob("client-*"):  # keep the pair in use and the one before it
            if stale.stem not in (f"client-{serial}", *(p.stem for p in previous or ())):
                stale.unlink(missing_ok=True)
        log.info("installed client certificate %s (valid until %s)", serial, leaf.not_valid_after_utc.isoformat())
        return None


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return None

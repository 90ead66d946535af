"""The certificate authority devices authenticate to the broker with: the controller's own, or the operator's.

X.509 by the ``cryptography`` package. The controller's CA is an ECDSA P-256 key and a self-signed CA
certificate in ``<data_dir>/pki`` (the key 0600), made on first use; an operator's CA (an intermediate of
their PKI, say) is used instead when both ``device_ca_cert_file`` and ``device_ca_key_file`` are set.
Device certificates carry the device id as their common name (the broker takes it as the user name),
clientAuth only, and start a minute in the past (the broker's clock may be a little behind the
controller's). The same CA may issue the embedded broker's server certificate, so a device needs one
CA file for both directions.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.db import secrets
from controller.db.secrets import SharedSecrets
from controller.errors import ControllerError

CA_CERT = "device-ca.pem"
CA_KEY = "device-ca.key"
#: device certificates start this far in the past: the broker checks them with its own clock
BACKDATE = dt.timedelta(minutes=1)
CA_YEARS = 20


class PkiError(ControllerError):
    """A certificate, key or request that cannot be used; the message says why."""


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes) -> None:
    """Write a secret (0600) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (0644) atomically: certificates and CRLs the broker reads."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def check_csr(text: str) -> x509.CertificateSigningRequest:
    """A certificate request whose self-signature verifies and whose key is strong enough, else PkiError."""
    try:
        csr = x509.load_pem_x509_csr(text.encode())
    except ValueError as exc:
        raise PkiError(f"the certificate request is not a PEM CSR: {exc}") from None
    if not csr.is_signature_valid:
        raise PkiError("the certificate request's signature does not verify")
    check_key(csr.public_key())
    return csr


def check_key(key: CertificatePublicKeyTypes) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size >= 256:
        return
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    raise PkiError("the certificate request's key is too weak: use ECDSA P-256 or better, RSA 2048+ or Ed25519")


def verify_with(cert: x509.Certificate, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` over ``data`` was made with the private key of ``cert``."""
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            from cryptography.hazmat.primitives.asymmetric import padding

            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    own: bool = True

    @property
    def cert_pem(self) -> str:
        return pem(self.cert)

    @classmethod
    def load_or_create(cls, pki_dir: Path, cert_file: Path | None = None, key_file: Path | None = None) -> Authority:
        """The operator's CA (both files given), else the controller's in ``pki_dir`` (created if missing)."""
        own = cert_file is None
        cert_path = cert_file or pki_dir / CA_CERT
        key_path = key_file or pki_dir / CA_KEY
        if own and not cert_path.exists():
            return cls._create(cert_path, key_path)
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise PkiError(f"the device CA ({cert_path}, {key_path}) cannot be read: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise PkiError(f"{key_path}: the device CA key must be ECDSA, RSA or Ed25519")
        if cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise PkiError(f"{key_path} is not the key of the CA certificate {cert_path}")
        try:
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            basic = None
        if basic is None or not basic.ca:
            raise PkiError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE)")
        return cls(cert, key, own)

    @classmethod
    def load_or_create_shared(cls, shared: SharedSecrets, pki_dir: Path) -> Authority:
        """The controller's own CA as every replica holds it: from the database (``shared_secret``), made by the
        first replica (from its ``pki_dir`` when it has one there), written to ``pki_dir`` for the broker."""
        cert_path, key_path = pki_dir / CA_CERT, pki_dir / CA_KEY
        local = (cert_path.read_bytes(), key_path.read_bytes()) if cert_path.is_file() and key_path.is_file() else None
        key_pem_bytes, cert_pem_bytes = shared.read(secrets.DEVICE_CA_KEY), shared.read(secrets.DEVICE_CA_CERT)
        if key_pem_bytes is None or cert_pem_bytes is None:
            if local is None:
                cls._create(cert_path, key_path)
                local = (cert_path.read_bytes(), key_path.read_bytes())
            offered = shared.offer({secrets.DEVICE_CA_KEY: local[1], secrets.DEVICE_CA_CERT: local[0]})
            key_pem_bytes, cert_pem_bytes = offered[secrets.DEVICE_CA_KEY], offered[secrets.DEVICE_CA_CERT]
        if local is not None and local[0] != cert_pem_bytes:
            raise PkiError(
                f"{cert_path} is another device CA than the one the replicas share in the database: devices"
                " certified by one are refused by a broker trusting the other. Move the pki directory away to use"
                " the shared CA, or set device_ca_cert_file and device_ca_key_file to one CA for every replica"
            )
        write_private(key_path, key_pem_bytes)
        write_public(cert_path, cert_pem_bytes)
        return cls.load_or_create(pki_dir)

    @classmethod
    def _create(cls, cert_path: Path, key_path: Path) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "slmfleet device CA")])
        now = utc_now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(key_path, key_pem(key))
        write_public(cert_path, pem(cert).encode())
        return cls(cert, key, True)

    def _leaf(
        self, subject: str, public_key: CertificatePublicKeyTypes, not_after: dt.datetime
    ) -> x509.CertificateBuilder:
        now = utc_now()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(not_after, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )

    def issue_client(
        self, device_id: str, public_key: CertificatePublicKeyTypes, valid: dt.timedelta
    ) -> x509.Certificate:
        """A client certificate for ``device_id`` (its common name: the broker's user name for it)."""
        builder = (
            self._leaf(device_id, public_key, utc_now() + valid)
            .add_extension(_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        return builder.sign(self.key, _hash(self.key))

    def issue_server(
        self, hosts: list[str], valid: dt.timedelta
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A server certificate (and its new key) for a broker reached at ``hosts`` (names or addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        cert = (
            self._leaf(hosts[0], key.public_key(), utc_now() + valid)
            .add_extension(_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.key, _hash(self.key))
        )
        return cert, key

    def crl(self, revoked: list[tuple[int, dt.datetime]], valid: dt.timedelta) -> bytes:
        """A CRL (PEM) listing ``revoked`` (serial, when); it expires after ``valid`` (re-issue it before)."""
        now = utc_now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + valid)
        )
        for serial, when in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            builder = builder.add_revoked_certificate(entry)
        return builder.sign(self.key, _hash(self.key)).public_bytes(serialization.Encoding.PEM)


def _hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_usage(cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )

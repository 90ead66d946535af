"""The device CA (controller.pki): issuing, renewal proofs, revocation lists; and the agent's side of renewal."""

from __future__ import annotations

import base64
import datetime as dt
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlmodel import Session, select

from agent.runtime import identity
from agent.runtime.identity import ClientIdentity
from controller.db.engine import make_engine, migrate
from controller.db.models import Device, DeviceCertificate
from controller.pki.authority import Authority, PkiError, check_csr
from controller.pki.service import DevicePki
from wire import signing
from wire.messages import CertificateRequest, InstallCertificate


@pytest.fixture
def pki(tmp_path: Path) -> DevicePki:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    migrate(engine)
    with Session(engine) as session:
        session.add(Device(id="dev-1"))
        session.commit()
    return DevicePki(
        engine, Authority.load_or_create(tmp_path / "pki"), tmp_path / "pki" / "crl.pem", dt.timedelta(hours=1)
    )


def enroll(pki: DevicePki, key: ec.EllipticCurvePrivateKey, device_id: str = "dev-1") -> x509.Certificate:
    with Session(pki.engine) as session:
        issued = pki.issue(session, device_id, identity.make_csr("whatever-the-device-asks", key))
        session.commit()
    return x509.load_pem_x509_certificates(issued.cert_pem.encode())[0]


def renewal(
    key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, new: ec.EllipticCurvePrivateKey, ts: float
) -> CertificateRequest:
    csr = identity.make_csr("dev-1", new)
    serial = format(cert.serial_number, "x")
    proof = key.sign(signing.cert_request_bytes("dev-1", csr, serial, ts), ec.ECDSA(hashes.SHA256()))
    return CertificateRequest(ts=ts, seq=1, csr_pem=csr, serial=serial, proof=base64.b64encode(proof).decode())


def test_certificates_name_the_enrolled_device_and_chain_to_the_ca(pki: DevicePki, tmp_path: Path) -> None:
    cert = enroll(pki, identity.new_key())
    assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "dev-1"
    cert.verify_directly_issued_by(pki.authority.cert)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (tmp_path / "pki" / "device-ca.key").stat().st_mode & 0o777 == 0o600
    assert Authority.load_or_create(tmp_path / "pki").cert == pki.authority.cert, "the CA is kept across starts"
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = x509.CertificateSigningRequestBuilder().subject_name(cert.subject).sign(weak, hashes.SHA256())
    with pytest.raises(PkiError, match="too weak"):
        check_csr(csr.public_bytes(serialization.Encoding.PEM).decode())
    with pytest.raises(PkiError, match="not a PEM CSR"):
        check_csr("hello")


def test_an_operators_ca_is_used_when_given_and_checked(tmp_path: Path) -> None:
    theirs = Authority.load_or_create(tmp_path / "operator")
    mine = Authority.load_or_create(
        tmp_path / "pki", tmp_path / "operator" / "device-ca.pem", tmp_path / "operator" / "device-ca.key"
    )
    assert mine.cert == theirs.cert and not mine.own
    other = Authority.load_or_create(tmp_path / "other")
    with pytest.raises(PkiError, match="is not the key of the CA certificate"):
        Authority.load_or_create(
            tmp_path / "x", tmp_path / "operator" / "device-ca.pem", tmp_path / "other" / "device-ca.key"
        )
    assert other.cert != theirs.cert


def test_renewal_needs_the_current_key_and_revokes_what_it_replaced(pki: DevicePki) -> None:
    key = identity.new_key()
    cert = enroll(pki, key)
    now = time.time()
    stranger = identity.new_key()
    with pytest.raises(PkiError, match="does not verify"):
        pki.renew("dev-1", renewal(stranger, cert, identity.new_key(), now), now)  # someone else's key
    with pytest.raises(PkiError, match="too old"):
        pki.renew("dev-1", renewal(key, cert, identity.new_key(), now - 3600), now)  # a replayed request
    new_key = identity.new_key()
    issued = pki.renew("dev-1", renewal(key, cert, new_key, now), now)
    new = x509.load_pem_x509_certificates(issued.cert_pem.encode())[0]
    assert _public(new.public_key()) == _public(new_key.public_key())
    with pytest.raises(PkiError, match="not again so soon"):
        pki.renew("dev-1", renewal(key, cert, identity.new_key(), now + 1), now + 1)
    assert pki.installed("dev-1", issued.serial) == 1  # the device acknowledged the new one: the old is revoked
    crl = x509.load_pem_x509_crl(pki.crl_file.read_bytes())
    assert [r.serial_number for r in crl] == [cert.serial_number]
    assert crl.next_update_utc is not None and crl.next_update_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=6)
    with pytest.raises(PkiError, match="not a valid certificate"):  # the revoked one cannot renew any more
        pki.renew("dev-1", renewal(key, cert, identity.new_key(), now + 60), now + 60)


def test_a_revoked_device_is_listed_and_cannot_renew(pki: DevicePki) -> None:
    key = identity.new_key()
    cert = enroll(pki, key)
    assert pki.revoke_device("dev-1") == 1
    assert [r.serial_number for r in x509.load_pem_x509_crl(pki.crl_file.read_bytes())] == [cert.serial_number]
    with Session(pki.engine) as session:
        device = session.get(Device, "dev-1")
        assert device is not None
        device.revoked_at = dt.datetime.now(dt.UTC)
        session.add(device)
        session.commit()
        assert session.exec(select(DeviceCertificate)).one().revoke_reason == "revoked"
    with pytest.raises(PkiError, match="revoked"):
        pki.renew("dev-1", renewal(key, cert, identity.new_key(), time.time()), time.time())


def test_the_agent_renews_a_third_before_expiry_and_installs_only_its_own(pki: DevicePki, tmp_path: Path) -> None:
    key = identity.new_key()
    cert = enroll(pki, key)
    (tmp_path / "client.pem").write_text(cert.public_bytes(serialization.Encoding.PEM).decode())
    (tmp_path / "client.key").write_bytes(identity.key_pem(key))
    agent = ClientIdentity("dev-1", tmp_path / "client.pem", tmp_path / "client.key", tmp_path / "tls")
    lifetime = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
    start = cert.not_valid_before_utc.timestamp()
    assert agent.renewal(start + lifetime * 0.6) is None  # two thirds left... not yet
    due = start + lifetime * 0.7
    request = agent.renewal(due)
    assert request is not None and agent.renewal(due + 1) is None, "not asked again at once"
    assert agent.next_wakeup() is not None and agent.next_wakeup() > due  # type: ignore[operator]
    issued = pki.renew("dev-1", request, request.ts)
    # a certificate for another key (an old request's, or forged) is refused; its own is installed
    other = enroll(pki, identity.new_key())
    wrong = InstallCertificate(
        ts=due, command_id="c", cert_pem=other.public_bytes(serialization.Encoding.PEM).decode(), serial="1"
    )
    assert "not for the key" in (agent.install(wrong, due) or "")
    right = InstallCertificate(ts=due, command_id="c", cert_pem=issued.cert_pem, serial=issued.serial)
    assert agent.install(right, due) is None
    cert_file, key_file = agent.files()
    assert cert_file.name == f"client-{issued.serial}.pem" and key_file.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "tls" / "pending.key").exists()
    restarted = ClientIdentity("dev-1", tmp_path / "client.pem", tmp_path / "client.key", tmp_path / "tls")
    assert restarted.files() == (cert_file, key_file), "after a restart the renewed pair is used"


def _public(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined, no-any-return]


def test_the_agent_takes_its_client_certificate_from_credentials_or_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.runtime.config import ConfigError, load_settings

    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_text("c")
    key.write_text("k")
    key.chmod(0o644)
    settings = load_settings(None, {"device_id": "d", "mqtt_cert_file": str(cert), "mqtt_key_file": str(key)})
    with pytest.raises(ConfigError, match="readable by others"):
        settings.client_cert_files()
    key.chmod(0o600)
    assert settings.client_cert_files() == (cert, key)
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    (creds / "mqtt-client-cert").write_text("")  # the installer's "none"
    (creds / "mqtt-client-key").write_text("")
    assert settings.client_cert_files() == (cert, key)
    (creds / "mqtt-client-cert").write_text("c")
    (creds / "mqtt-client-key").write_text("k")
    assert settings.client_cert_files() == (creds / "mqtt-client-cert", creds / "mqtt-client-key")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert load_settings(None, {"device_id": "d"}).client_cert_files() is None
    with pytest.raises(ConfigError, match="go together"):
        load_settings(None, {"device_id": "d", "mqtt_cert_file": str(cert)}).client_cert_files()

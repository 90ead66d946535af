"""The embedded mosquitto's side of mutual TLS: which CA it trusts for clients, its own certificate, the CRL.

Devices connect to a listener that requires a client certificate from the device CA (the certificate's
common name becomes the user name and the client id, so a device can neither borrow another's session nor
its ACLs); the controller connects to a second listener on loopback. Without an operator's server
certificate (``embedded_broker_tls_cert_file``) the device CA issues one for the broker's addresses, so a
device needs a single CA file for both directions.
"""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from sqlalchemy import Engine

from controller.broker.embedded import ClientCertListener
from controller.db.secrets import SharedSecrets
from controller.pki.authority import Authority, key_pem, pem, utc_now, write_private, write_public
from controller.pki.service import CRL_FILE, empty_crl_if_missing
from controller.settings import ControllerSettings

SERVER_CERT = "broker.pem"
SERVER_KEY = "broker.key"
SERVER_VALID = dt.timedelta(days=365)
#: the broker's certificate is issued again when less than this is left
SERVER_RENEW = dt.timedelta(days=30)


def pki_dir(settings: ControllerSettings) -> Path:
    return settings.data_dir / "pki"


def crl_path(settings: ControllerSettings) -> Path:
    return settings.device_crl_file or pki_dir(settings) / CRL_FILE


def authority(settings: ControllerSettings, engine: Engine | None = None) -> Authority:
    """The operator's CA, else the controller's own: shared through the database (``engine``) when the artifacts
    are (several replicas issue certificates the one broker must trust)."""
    if settings.device_ca_cert_file is None and settings.shared_artifacts and engine is not None:
        return Authority.load_or_create_shared(SharedSecrets(engine, settings.shared_secrets_key), pki_dir(settings))
    return Authority.load_or_create(pki_dir(settings), settings.device_ca_cert_file, settings.device_ca_key_file)


def broker_hosts(settings: ControllerSettings) -> list[str]:
    """The names and addresses devices may reach the embedded broker at."""
    hosts = [settings.embedded_broker_host]
    if settings.device_broker_url:
        hosts.insert(0, urlsplit(settings.device_broker_url).hostname or "")
    hosts += ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    return [h for h in dict.fromkeys(hosts) if h and h not in ("0.0.0.0", "::")]


def prepare_embedded(settings: ControllerSettings) -> ClientCertListener:
    """The device CA, the broker's certificate (issued or renewed here when it is ours) and a CRL file."""
    ca = authority(settings)
    directory = pki_dir(settings)
    ca_file = settings.device_ca_cert_file or directory / "device-ca.pem"
    crl = crl_path(settings)
    empty_crl_if_missing(ca, crl)
    if settings.embedded_broker_tls_cert_file is not None and settings.embedded_broker_tls_key_file is not None:
        cert_file, key_file = settings.embedded_broker_tls_cert_file, settings.embedded_broker_tls_key_file
        return ClientCertListener(ca_file, crl, cert_file, key_file, None)
    cert_file, key_file = directory / SERVER_CERT, directory / SERVER_KEY
    hosts = broker_hosts(settings)
    if _needs_new_server_cert(cert_file, key_file, hosts):
        cert, key = ca.issue_server(hosts, SERVER_VALID)
        write_private(key_file, key_pem(key))
        write_public(cert_file, pem(cert).encode())
    return ClientCertListener(ca_file, crl, cert_file, key_file, ca_file)


def _needs_new_server_cert(cert_file: Path, key_file: Path, hosts: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return True
    if not key_file.is_file() or cert.not_valid_after_utc - utc_now() < SERVER_RENEW:
        return True
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    have = {str(v) for v in names.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in names.get_values_for_type(x509.IPAddress)}
    return not set(hosts) <= have


def device_settings(embedded_url: str, listener: ClientCertListener, settings: ControllerSettings) -> dict[str, object]:
    """Settings once the embedded broker runs with client certificates: devices get its certificate listener
    (and the CA that verifies it) at enrollment, unless the operator chose others."""
    update: dict[str, object] = {}
    if settings.device_broker_url is None:
        update["device_broker_url"] = embedded_url
    if settings.broker_ca_file is None and listener.server_ca_file is not None:
        update["broker_ca_file"] = listener.server_ca_file
    return update

"""``slmfleet agent enroll``: exchange an enrollment token for this device's identity and credentials.

Writes into a directory (default ``/etc/slmfleet``, where the systemd unit
loads its credentials from; created with mode 0700 if missing), the secrets
with mode 0600:

- ``agent.toml`` (mode 0640, no secret in it: the service's group may read it):
  device id, broker URL, broker user, labels and the paths below;
- ``mqtt-password``: the device's own broker password (when the broker takes
  per-device credentials);
- ``signing-key.pem``: the controller's public key, pinned: manifests must be
  signed with its private half;
- ``broker-ca.pem``: the CA of the broker's TLS certificate, if the controller
  hands one out;
- ``client.key`` and ``client.pem``: this device's key (made here, it never leaves
  the device) and the client certificate the controller issued for it, when the
  broker authenticates devices by certificate (mutual TLS).

Only the standard library talks to the controller (the agent stays light);
HTTPS certificates are verified (``--ca-file`` for a private CA).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.deploy.fsutil import atomic_write
from agent.runtime import identity
from wire import topics

CONFIG_NAME = "agent.toml"
PASSWORD_NAME = "mqtt-password"
SIGNING_KEY_NAME = "signing-key.pem"
BROKER_CA_NAME = "broker-ca.pem"
CLIENT_KEY_NAME = "client.key"
CLIENT_CERT_NAME = "client.pem"


class EnrollError(Exception):
    """Enrollment failed; the message says why."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slmfleet agent enroll",
        description="Exchange an enrollment token for this device's identity, broker credentials and the"
        " controller's signing key, and write them (mode 0600) with an agent.toml to run with.",
    )
    p.add_argument("--controller", required=True, help="the controller's URL, e.g. https://fleet.example:8080")
    token = p.add_mutually_exclusive_group(required=True)
    token.add_argument("--token", help="the enrollment token (visible in the process list: prefer --token-file)")
    token.add_argument("--token-file", type=Path, help="file holding the enrollment token")
    p.add_argument("--device-id", help="the id this device asks for (default: the token's, else one is chosen)")
    p.add_argument("--dir", type=Path, default=Path("/etc/slmfleet"), help="where to write (default /etc/slmfleet)")
    p.add_argument("--data-dir", type=Path, help="agent state directory to put in agent.toml")
    p.add_argument("--ca-file", type=Path, help="CA bundle that verifies the controller's HTTPS certificate")
    p.add_argument("--force", action="store_true", help="overwrite an existing enrollment in --dir")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the controller (default 30)")
    return p


def request_enrollment(
    controller: str,
    token: str,
    device_id: str | None,
    ca_file: Path | None,
    timeout: float,
    csr_pem: str | None = None,
) -> dict[str, Any]:
    """POST /api/v1/enroll; the controller's answer as a dict. Raises EnrollError with its reason.

    ``csr_pem`` asks for a client certificate too; a controller that does not know the field (older than
    this agent) refuses it before using the token, and the request is repeated without it.
    """
    if not controller.startswith(("http://", "https://")):
        raise EnrollError(f"--controller {controller!r}: give a URL starting with http:// or https://")
    try:
        return _post_enroll(controller, token, device_id, ca_file, timeout, csr_pem)
    except _UnknownField:
        return _post_enroll(controller, token, device_id, ca_file, timeout, None)


class _UnknownField(Exception):
    pass


def _post_enroll(
    controller: str, token: str, device_id: str | None, ca_file: Path | None, timeout: float, csr_pem: str | None
) -> dict[str, Any]:
    fields: dict[str, str] = {"token": token}
    if device_id:
        fields["device_id"] = device_id
    if csr_pem:
        fields["csr_pem"] = csr_pem
    body = json.dumps(fields).encode()
    req = urllib.request.Request(
        controller.rstrip("/") + "/api/v1/enroll",
        data=body,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:  # noqa: S310 - http(s) only
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", "")
        except (ValueError, AttributeError):
            detail = ""
        if exc.code == 422 and csr_pem and "csr_pem" in json.dumps(detail) and "extra" in json.dumps(detail).lower():
            raise _UnknownField() from None
        raise EnrollError(f"the controller refused the enrollment ({exc.code}): {detail or exc.reason}") from None
    except urllib.error.URLError as exc:
        raise EnrollError(f"cannot reach the controller at {controller}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise EnrollError(f"enrollment at {controller} failed: {exc}") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("device_id"), str):
        raise EnrollError("the controller's answer is not an enrollment")
    topics.check_id(answer["device_id"])
    return answer


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_enrollment(
    answer: dict[str, Any], directory: Path, data_dir: Path | None, client_key_pem: bytes | None = None
) -> Path:
    """Write the credentials and agent.toml into ``directory``; returns agent.toml's path."""
    if not directory.is_dir():
        directory.mkdir(parents=True, mode=0o700)
    directory = directory.resolve()
    lines = [
        "# Written by 'slmfleet agent enroll'. Run: slmfleet agent --config " + str(directory / CONFIG_NAME),
        "[agent]",
        f"device_id = {_toml_str(answer['device_id'])}",
        f"broker = {_toml_str(str(answer['broker_url']))}",
    ]
    if data_dir is not None:
        lines.append(f"data_dir = {_toml_str(str(data_dir.resolve()))}")
    if answer.get("mqtt_username"):
        atomic_write(directory / PASSWORD_NAME, (str(answer.get("mqtt_password") or "") + "\n").encode())
        lines.append(f"mqtt_username = {_toml_str(str(answer['mqtt_username']))}")
        lines.append(f"mqtt_password_file = {_toml_str(str(directory / PASSWORD_NAME))}")
    atomic_write(directory / SIGNING_KEY_NAME, str(answer["signing_public_key_pem"]).encode())
    lines.append(f"signing_key_file = {_toml_str(str(directory / SIGNING_KEY_NAME))}")
    if answer.get("broker_ca_pem"):
        atomic_write(directory / BROKER_CA_NAME, str(answer["broker_ca_pem"]).encode())
        lines.append(f"ca_file = {_toml_str(str(directory / BROKER_CA_NAME))}")
    if answer.get("client_cert_pem") and client_key_pem is not None:
        atomic_write(directory / CLIENT_KEY_NAME, client_key_pem)
        atomic_write(directory / CLIENT_CERT_NAME, str(answer["client_cert_pem"]).encode(), 0o644)
        lines.append(f"mqtt_cert_file = {_toml_str(str(directory / CLIENT_CERT_NAME))}")
        lines.append(f"mqtt_key_file = {_toml_str(str(directory / CLIENT_KEY_NAME))}")
    labels = answer.get("labels") or {}
    if labels:
        lines.append("[agent.labels]")
        lines += [f"{_toml_str(str(k))} = {_toml_str(str(v))}" for k, v in sorted(labels.items())]
    config = directory / CONFIG_NAME
    atomic_write(config, ("\n".join(lines) + "\n").encode(), 0o640)
    return config


def enroll_main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    config = args.dir / CONFIG_NAME
    if config.exists() and not args.force:
        print(  # noqa: T201
            f"error: {config} exists: this device is enrolled already (--force to replace it)", file=sys.stderr
        )
        return 2
    try:
        token = args.token if args.token is not None else args.token_file.read_text().strip()
    except OSError as exc:
        print(f"error: cannot read {args.token_file}: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    # The device's own key for a client certificate: made here, it never leaves the device.
    key = identity.new_key()
    csr = identity.make_csr(args.device_id or "device", key)
    try:
        answer = request_enrollment(args.controller, token, args.device_id, args.ca_file, args.timeout, csr)
        written = write_enrollment(answer, args.dir, args.data_dir, identity.key_pem(key))
    except (EnrollError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    except OSError as exc:
        print(f"error: cannot write the enrollment into {args.dir}: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    cert = " with a client certificate" if answer.get("client_cert_pem") else ""
    print(  # noqa: T201
        f"enrolled as {answer['device_id']}{cert} (broker {answer['broker_url']});"
        f" secrets in {args.dir} (mode 0600)\nrun: slmfleet agent --config {written}"
    )
    return 0

"""Ed25519 signatures: what the controller signs and how a device checks it, for every signed thing.

Lives in the wire package (imported by both sides) so a device verifies with exactly the code that signed,
without any controller dependency. One layout per signed thing, each here and nowhere else:

* **manifests** (``sign``/``verify``): the canonical JSON of the manifest (``Manifest.canonical_bytes``).
  Not bound to a device: an artifact is the same for the whole fleet.
* **rollback grants** (``sign_grant``/``verify_grant_signature``): the canonical JSON of the grant, which
  names the device, the deployment and the older artifact it may install.
* **certificate renewals** (``cert_request_bytes``): the device signs, with the key of its current client
  certificate, ``canonical_json({"domain": CERT_REQUEST_DOMAIN, "device_id", "csr_sha256", "serial", "ts"})``.
* **commands** (``seal_command``/``open_command``): every command but ``ping`` carries ``auth``
  (``messages.CommandAuth``): the device it is for, when it was issued and expires, a random nonce and the
  signature over ``canonical_json({"domain": COMMAND_DOMAIN, "auth": <auth without signature>,
  "body_sha256": sha256(canonical_json(<the command without auth>))})``. The digest covers every field the
  controller sent, known to this schema or not. The agent also refuses a nonce it has seen
  (``agent.core.guard``), so a genuine command cannot be replayed to another device, later, or twice.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ValidationError

from wire.manifest import Manifest, SignedManifest, canonical_json
from wire.messages import CommandAuth, RollbackGrant

#: separates command signatures from every other signed thing (a manifest can never pass as a command)
COMMAND_DOMAIN = "slmfleet/v1/command"
#: separates a device's proof of its current key (certificate renewal) from everything else signed
CERT_REQUEST_DOMAIN = "slmfleet/v1/cert-request"
#: the longest a command may be valid: bounds how long a device must remember nonces to refuse replays
MAX_COMMAND_TTL_S = 7 * 86400.0


class VerificationError(Exception):
    """A manifest must not be installed; ``reason`` is a short label, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable id for a public key: the first 16 hex digits of sha256(raw key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """Parse a PEM public key; raise ValueError unless it is Ed25519."""
    data = pem.encode() if isinstance(pem, str) else pem
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the pinned signing key is not an Ed25519 public key")
    return key


def sign(manifest: Manifest, private_key: Ed25519PrivateKey) -> SignedManifest:
    signature = private_key.sign(manifest.canonical_bytes())
    return SignedManifest(
        manifest=manifest,
        signature=base64.b64encode(signature).decode(),
        key_id=key_id(private_key.public_key()),
    )


def verify(
    signed: SignedManifest,
    public_key: Ed25519PublicKey,
    *,
    now: float | None = None,
    installed_version: int | None = None,
    allow_version: int | None = None,
) -> Manifest:
    """Return the manifest if it may be installed, else raise VerificationError.

    Checks the signature against the pinned key, the expiry, and that the
    version is newer than ``installed_version`` unless it equals
    ``allow_version`` (a version named by a signed rollback command).
    """
    expected_id = key_id(public_key)
    if signed.key_id != expected_id:
        raise VerificationError(
            "wrong_key", f"manifest signed by key {signed.key_id}, this device trusts key {expected_id}"
        )
    try:
        signature = base64.b64decode(signed.signature, validate=True)
    except ValueError:
        raise VerificationError("bad_signature", "the signature is not valid base64") from None
    try:
        public_key.verify(signature, signed.manifest.canonical_bytes())
    except InvalidSignature:
        raise VerificationError("bad_signature", "the manifest signature does not verify: tampered or forged") from None
    manifest = signed.manifest
    now = time.time() if now is None else now
    if manifest.expires_at is not None and manifest.expires_at <= now:
        raise VerificationError(
            "expired", f"manifest of {manifest.model} v{manifest.version} expired at {manifest.expires_at:.0f}"
        )
    if installed_version is not None and manifest.version <= installed_version and manifest.version != allow_version:
        raise VerificationError(
            "older_version",
            f"{manifest.model} v{manifest.version} is not newer than the installed v{installed_version};"
            " only a signed rollback command may install it",
        )
    return manifest


# ------------------------------------------------------------ rollback grants --


def grant_bytes(grant: RollbackGrant) -> bytes:
    """The bytes a rollback grant's signature covers."""
    return canonical_json(grant.model_dump(mode="json"))


def sign_grant(grant: RollbackGrant, private_key: Ed25519PrivateKey) -> str:
    """The base64 signature a controller puts into ``Rollback.signature``."""
    return base64.b64encode(private_key.sign(grant_bytes(grant))).decode()


def verify_grant_signature(grant: RollbackGrant, signature: str, public_key: Ed25519PublicKey) -> None:
    """Raise VerificationError unless ``signature`` is the controller's over ``grant``."""
    try:
        public_key.verify(base64.b64decode(signature, validate=True), grant_bytes(grant))
    except (binascii.Error, ValueError, InvalidSignature):
        raise VerificationError("bad_signature", "the rollback grant's signature does not verify") from None


# ------------------------------------------------------- certificate renewals --


def cert_request_bytes(device_id: str, csr_pem: str, serial: str, ts: float) -> bytes:
    """What a device signs with its current client key to ask for a new certificate (``CertificateRequest``)."""
    return canonical_json(
        {
            "domain": CERT_REQUEST_DOMAIN,
            "device_id": device_id,
            "csr_sha256": hashlib.sha256(csr_pem.encode()).hexdigest(),
            "serial": serial,
            "ts": ts,
        }
    )


# ------------------------------------------------------------------- commands --


@dataclass(frozen=True)
class CommandBody:
    """A command without ``auth``, serialized once: the same Deploy goes to many devices, each sealed for one."""

    json: bytes
    digest: str


def body_digest(obj: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a command object without its ``auth``."""
    return hashlib.sha256(canonical_json({k: v for k, v in obj.items() if k != "auth"})).hexdigest()


def command_body(command: BaseModel) -> CommandBody:
    """Serialize ``command`` (its ``auth`` left out) for sealing, possibly for many devices."""
    obj = command.model_dump(mode="json", exclude_none=True, exclude={"auth"})
    return CommandBody(_dumps(obj), body_digest(obj))


def command_signed_bytes(auth: dict[str, Any], digest: str) -> bytes:
    """The exact bytes a command's signature covers (``auth`` without its ``signature``)."""
    fields = {k: v for k, v in auth.items() if k != "signature"}
    return canonical_json({"domain": COMMAND_DOMAIN, "auth": fields, "body_sha256": digest})


def seal_command(
    body: CommandBody | BaseModel,
    private_key: Ed25519PrivateKey,
    *,
    device_id: str,
    now: float,
    ttl_s: float,
    nonce: str | None = None,
) -> bytes:
    """The wire payload of a command signed for ``device_id``, valid for ``ttl_s`` seconds from ``now``."""
    if not isinstance(body, CommandBody):
        body = command_body(body)
    ttl_s = min(ttl_s, MAX_COMMAND_TTL_S)
    auth: dict[str, Any] = {
        "device_id": device_id,
        "issued_at": now,
        "expires_at": now + ttl_s,
        "nonce": nonce or secrets.token_hex(16),
        "key_id": key_id(private_key.public_key()),
    }
    auth["signature"] = base64.b64encode(private_key.sign(command_signed_bytes(auth, body.digest))).decode()
    # The body is a JSON object: splice auth in before its closing brace instead of serializing it again.
    return body.json[:-1] + b',"auth":' + _dumps(auth) + b"}"


def open_command(
    obj: dict[str, Any], public_key: Ed25519PublicKey | None, *, device_id: str, now: float
) -> CommandAuth:
    """The command object's ``auth`` if the controller signed it for ``device_id`` and it has not expired.

    ``obj`` is the parsed JSON object exactly as received (``codec.parse_command``). Raises
    VerificationError with ``reason`` unsigned, no_key, bad_auth, wrong_key, bad_signature, wrong_device,
    expired or too_long. The nonce is not checked here: that needs the device's memory (``agent.core.guard``).
    """
    raw = obj.get("auth")
    if raw is None:
        raise VerificationError(
            "unsigned",
            "the command is not signed; this agent obeys only commands its controller signed for it"
            " (is the controller older than the agent?)",
        )
    if public_key is None:
        raise VerificationError(
            "no_key", "this agent has no pinned signing key (set signing_key_file): it obeys no signed command"
        )
    try:
        auth = CommandAuth.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "auth"
        raise VerificationError("bad_auth", f"the command's auth is malformed: {where}: {first['msg']}") from None
    expected = key_id(public_key)
    if auth.key_id != expected:
        raise VerificationError("wrong_key", f"command signed by key {auth.key_id}, this device trusts key {expected}")
    try:
        signature = base64.b64decode(auth.signature, validate=True)
        public_key.verify(signature, command_signed_bytes(raw, body_digest(obj)))
    except (binascii.Error, ValueError, InvalidSignature):
        raise VerificationError(
            "bad_signature", "the command's signature does not verify: tampered or forged"
        ) from None
    if auth.device_id != device_id:
        raise VerificationError("wrong_device", f"the command was signed for device {auth.device_id}, not {device_id}")
    if auth.expires_at <= now:
        raise VerificationError(
            "expired", f"the command expired {now - auth.expires_at:.0f} s ago (at {auth.expires_at:.0f})"
        )
    if auth.expires_at - auth.issued_at > MAX_COMMAND_TTL_S:
        raise VerificationError(
            "too_long", f"the command is valid for more than {MAX_COMMAND_TTL_S:.0f} s; refusing it"
        )
    return auth


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

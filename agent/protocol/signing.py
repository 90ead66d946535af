"""Ed25519 signatures over manifests: signing (controller) and verification (agent).

Lives in the protocol package so a device verifies with exactly the code that
signed, without any controller dependency.
"""

from __future__ import annotations

import base64
import hashlib
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.protocol.manifest import Manifest, SignedManifest


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

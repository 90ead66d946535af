"""Checks against the pinned key: manifests (signature, expiry, version) and rollback grants."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.deploy.ids import artifact_id
from wire import signing
from wire.manifest import Manifest, SignedManifest
from wire.messages import Rollback, RollbackGrant
from wire.signing import VerificationError

__all__ = ["VerificationError", "check_manifest", "load_pinned_key", "verify_grant"]


def load_pinned_key(path: Path) -> Ed25519PublicKey:
    """The controller's public key pinned at enrollment (PEM). Raises ValueError saying what is wrong."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the pinned signing key {path}: {exc.strerror or exc}") from None
    try:
        return signing.load_public_key(data)
    except ValueError as exc:
        raise ValueError(f"{path} is not an Ed25519 public key in PEM form: {exc}") from None


def check_manifest(
    signed: SignedManifest,
    key: Ed25519PublicKey | None,
    *,
    now: float,
    installed: Manifest | None,
    allow_version: int | None = None,
) -> Manifest:
    """The manifest if it may be installed over ``installed`` (the active model), else VerificationError.

    The version must be newer than the installed one of the same model, unless it is ``allow_version``
    (named by a verified rollback grant) or another variant of the installed version (v1 fp32 -> v1 int8:
    the same signed version, smaller or larger, e.g. under memory pressure; nothing older comes back).
    """
    if key is None:
        raise VerificationError(
            "no_key", "this agent has no pinned signing key (set signing_key_file); it installs nothing unsigned"
        )
    same_model = installed is not None and installed.model == signed.manifest.model
    if (
        same_model
        and installed is not None
        and installed.version == signed.manifest.version
        and installed.variant != signed.manifest.variant
    ):
        same_model = False  # a variant switch within the installed version: not a downgrade
    return signing.verify(
        signed,
        key,
        now=now,
        installed_version=installed.version if same_model and installed is not None else None,
        allow_version=allow_version,
    )


def verify_grant(command: Rollback, key: Ed25519PublicKey | None, *, device_id: str, now: float) -> RollbackGrant:
    """The grant if this device may act on it, else VerificationError."""
    grant = command.grant
    if key is None:
        raise VerificationError("no_key", "this agent has no pinned signing key (set signing_key_file)")
    signing.verify_grant_signature(grant, command.signature, key)
    if grant.device_id != device_id:
        raise VerificationError("wrong_device", f"the rollback grant names device {grant.device_id}, not {device_id}")
    if grant.deployment_id != command.deployment_id:
        raise VerificationError(
            "wrong_deployment",
            f"the rollback grant names deployment {grant.deployment_id}, the command {command.deployment_id}",
        )
    if grant.expires_at <= now:
        raise VerificationError("expired", f"the rollback grant expired at {grant.expires_at:.0f}")
    if command.manifest is not None:
        m = command.manifest.manifest
        if (artifact_id(m), m.model, m.version) != (grant.artifact_id, grant.model, grant.version):
            raise VerificationError(
                "grant_mismatch",
                f"the rollback carries {m.model} v{m.version} ({artifact_id(m)[:12]}), the grant names"
                f" {grant.model} v{grant.version} ({grant.artifact_id[:12]})",
            )
    return grant

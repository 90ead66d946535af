"""The controller's Ed25519 signing key: created on first start, kept in the data directory (0600)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controller.db.secrets import SIGNING_KEY as SIGNING_KEY_SECRET
from controller.db.secrets import SharedSecrets
from controller.errors import ControllerError
from wire.signing import key_id, public_key_pem

KEY_FILE = "signing-key.pem"
#: the public half, for devices to pin (``slmfleet agent --signing-key-file``); not a secret
PUBLIC_KEY_FILE = "signing-key.pub.pem"


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    path: Path

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public)

    @property
    def public_pem(self) -> str:
        return public_key_pem(self.public)


def load_or_create(keys_dir: Path) -> SigningKey:
    """The key in ``keys_dir``, created (mode 0600) if there is none yet."""
    path = keys_dir / KEY_FILE
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, 0o600)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ControllerError(f"the signing key {path} cannot be read ({exc}); restore it from a backup") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ControllerError(f"{path} is not an Ed25519 private key")
        return SigningKey(key, path)
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = path.with_name(KEY_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return SigningKey(key, path)


def _parse(pem: bytes, where: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ControllerError(f"the signing key {where} cannot be read ({exc}); restore it from a backup") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ControllerError(f"{where} is not an Ed25519 private key")
    return key


def load_shared(shared: SharedSecrets, keys_dir: Path) -> SigningKey:
    """The key every replica signs with, from the database (``shared_secret`` ``signing-key``).

    The first replica stores its data directory's key when it has one (devices of an existing install pin it),
    else a new one. A data directory holding another key is refused: devices pinned to one would refuse
    manifests signed with the other."""
    path = keys_dir / KEY_FILE
    local = path.read_bytes() if path.is_file() else None

    def make() -> bytes:
        if local is not None:
            return local
        return Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    key = _parse(shared.get_or_make(SIGNING_KEY_SECRET, make), "in the database (shared_secret)")
    if local is not None and key_id(_parse(local, str(path)).public_key()) != key_id(key.public_key()):
        raise ControllerError(
            f"{path} holds another signing key than the one the replicas share in the database: devices pinned to"
            " one refuse manifests signed with the other. Move it away to sign with the shared key (devices that"
            " pinned it must be given the key from GET /api/v1/signing-key), or start this controller with"
            ' artifact_store = "local" and its own database'
        )
    return SigningKey(key, path)


def write_public(key: SigningKey, path: Path) -> Path:
    """Write the public key (PEM, mode 0644) to ``path`` unless it already holds it; returns ``path``."""
    pem = key.public_pem
    if not path.is_file() or path.read_text() != pem:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(pem)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return path

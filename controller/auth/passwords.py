"""Password hashing for dashboard users: salted scrypt from the standard library.

The parameters are stored with each hash, so they can be raised later; a login with a hash made
under weaker parameters rehashes it (``needs_rehash``). N=2^15, r=8, p=3 is one of OWASP's
equivalent scrypt settings: 32 MiB and about 0.3 s of one core per hash.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

SCHEME = "scrypt"
N, R, P = 2**15, 8, 3
DKLEN = 32
MIN_LENGTH = 10
MAX_LENGTH = 1024


class PasswordError(ValueError):
    """A password that cannot be used; the message says why."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=256 * 2**20)


def check_policy(password: str) -> None:
    """Refuse passwords too short to resist guessing, or long enough to be a denial of service."""
    if len(password) < MIN_LENGTH:
        raise PasswordError(f"a password needs at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise PasswordError(f"a password may have at most {MAX_LENGTH} characters")


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64 without padding)."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, N, R, P, DKLEN)
    return f"{SCHEME}${N}${R}${P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; a malformed hash never matches."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        expected = _unb64(digest)
        actual = _scrypt(password[:MAX_LENGTH], _unb64(salt), int(n), int(r), int(p), len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def needs_rehash(stored: str) -> bool:
    """True when ``stored`` was made with other parameters than the current ones."""
    return not stored.startswith(f"{SCHEME}${N}${R}${P}$")


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def burn_time(password: str) -> None:
    """Spend what a real check costs, so an unknown user name answers as slowly as a wrong password."""
    verify_password(password, _dummy_hash())


def generate_password() -> str:
    """A random password for generated accounts (24 URL-safe characters, 144 bits)."""
    return secrets.token_urlsafe(18)

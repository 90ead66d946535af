"""Webhook signatures as the Standard Webhooks specification has them, so receivers can verify with its
libraries (``standardwebhooks``, ``svix``) or a few lines of their own:

``webhook-signature: v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>`` where the key
is the base64 part of the secret ``whsec_<base64>``. The timestamp (Unix seconds) is signed with the body,
so a receiver that refuses timestamps older than a few minutes stops replays.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

PREFIX = "whsec_"
#: key sizes accepted for secrets an admin brings (the spec asks for 24 to 64 bytes)
MIN_KEY, MAX_KEY = 24, 64


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def key_of(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; ValueError saying what is wrong."""
    if not secret.startswith(PREFIX):
        raise ValueError(f"a webhook secret starts with {PREFIX} followed by base64 (omit it to get one generated)")
    try:
        key = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the webhook secret after whsec_ is not valid base64") from None
    if not MIN_KEY <= len(key) <= MAX_KEY:
        raise ValueError(f"the webhook secret must decode to {MIN_KEY}-{MAX_KEY} bytes, not {len(key)}")
    return key


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    digest = hmac.new(key_of(secret), f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, message_id: str, timestamp: int, body: str, header: str) -> bool:
    """True when one of the header's space-separated ``v1,...`` signatures matches (the receiver's check)."""
    expected = sign(secret, message_id, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in header.split(" "))

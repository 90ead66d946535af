"""What the core asks its driver to do."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish a message. ``durable`` ones are kept in the spool while offline."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    durable: bool = False


@dataclass(frozen=True, slots=True)
class Subscribe:
    filter: str
    qos: int = 1


Action = Publish | Subscribe

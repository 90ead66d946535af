"""The transport interface shared by the paho and in-memory implementations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Will:
    """A last-will message the broker publishes when the connection dies uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class TransportRefused(Exception):
    """The broker refused the connection for a reason retrying cannot fix (credentials, ACL)."""


class Transport(Protocol):
    """Publish, subscribe, and be told about messages and connection changes.

    Callbacks run on the transport's own thread or event loop; they must not block.
    Subscriptions persist across reconnects: the transport re-applies them.
    """

    on_connect: Callable[[], None] | None
    on_disconnect: Callable[[str], None] | None
    on_message: Callable[[str, bytes], None] | None
    on_published: Callable[[int], None] | None

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """Queue a message; returns its message id (0 when it could not be queued)."""
        ...

    def subscribe(self, filter_: str, qos: int = 1) -> None: ...

    def unsubscribe(self, filter_: str) -> None: ...

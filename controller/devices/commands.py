"""Commands to devices: each sealed for its one device with the controller's key, then published.

What is signed and how lives in ``wire.signing`` (the agent checks with the same code); this
is the controller's side: one sender, used by deployments, rollbacks and device configuration, so no
command leaves the controller unsigned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pydantic import BaseModel

from controller.registry.keys import SigningKey
from wire import signing, topics
from wire.signing import CommandBody

log = logging.getLogger(__name__)

#: how long a command stays valid by default; devices whose clock is further off than this refuse commands
DEFAULT_TTL_S = 3600.0

Publish = Callable[[str, bytes], object]


class CommandSender:
    """``send(device_id, command)`` from any thread; ``publish`` is set once the broker connection exists."""

    def __init__(self, key: SigningKey, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.ttl_s = ttl_s
        self.clock = clock
        self.publish: Publish | None = None

    def seal(self, device_id: str, command: BaseModel | CommandBody) -> bytes:
        """The wire payload of ``command`` signed for ``device_id`` (a fresh nonce and expiry each time)."""
        return signing.seal_command(command, self.key.private, device_id=device_id, now=self.clock(), ttl_s=self.ttl_s)

    def send(self, device_id: str, command: BaseModel | CommandBody) -> bool:
        """Seal and publish on the device's command topic (QoS 1); False when there is no connection yet."""
        if self.publish is None:
            return False
        self.publish(topics.cmd(device_id), self.seal(device_id, command))
        return True

"""Which commands an agent obeys: signed for this device by the pinned key, unexpired, and each only once.

``wire.signing.open_command`` checks the signature, the device id and the expiry; this adds the
device's memory: the nonce of every command it accepted, kept (and persisted before the command acts)
until the command expires, so a genuine command replayed to the same device is refused too. The memory
is bounded: when a nonce is forgotten (expired, or evicted as the oldest of ``max_remembered``) the
``floor`` rises to its issue time, and anything issued at or before the floor is refused.

Sans-IO like the rest of the core: the store that persists the memory is handed in (a file on devices,
memory in simulated fleets).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from wire import signing
from wire.messages import CommandAuth
from wire.signing import VerificationError

log = logging.getLogger(__name__)

#: nonces remembered at most (a device accepts a handful of commands a day; only replays could need more)
MAX_REMEMBERED = 4096


@dataclass
class NonceMemory:
    """The nonces of accepted, unexpired commands: nonce -> (issued_at, expires_at); and the floor."""

    seen: dict[str, tuple[float, float]] = field(default_factory=dict)
    floor: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps({"floor": self.floor, "seen": {k: list(v) for k, v in self.seen.items()}}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NonceMemory:
        obj: Any = json.loads(data)
        seen = {str(k): (float(v[0]), float(v[1])) for k, v in dict(obj.get("seen", {})).items()}
        return cls(seen=seen, floor=float(obj.get("floor", 0.0)))


class NonceStore(Protocol):
    """Durable storage of the NonceMemory."""

    def load(self) -> NonceMemory: ...

    def save(self, memory: NonceMemory) -> None: ...


class MemoryNonceStore:
    """In memory: unit tests and simulated devices (whose "disk" is an object that outlives a power loss)."""

    def __init__(self) -> None:
        self._data = NonceMemory().to_json()
        self.saves = 0

    def load(self) -> NonceMemory:
        return NonceMemory.from_json(self._data)

    def save(self, memory: NonceMemory) -> None:
        self._data = memory.to_json()
        self.saves += 1


class CommandGuard:
    """Admits a command object (``codec.parse_command``) or raises VerificationError saying why not."""

    def __init__(
        self,
        device_id: str,
        key: Ed25519PublicKey | None,
        store: NonceStore | None = None,
        max_remembered: int = MAX_REMEMBERED,
    ) -> None:
        self.device_id = device_id
        self.key = key
        self.store = store or MemoryNonceStore()
        self.max_remembered = max_remembered
        self.memory = self.store.load()

    def admit(self, obj: dict[str, Any], now: float) -> CommandAuth:
        """Check the signature, device, expiry and nonce; remember the nonce (persisted) before returning."""
        self._forget_expired(now)
        auth = signing.open_command(obj, self.key, device_id=self.device_id, now=now)
        memory = self.memory
        if auth.nonce in memory.seen:
            raise VerificationError("replay", f"command nonce {auth.nonce[:8]} was accepted before: a replay")
        if auth.issued_at <= memory.floor:
            raise VerificationError(
                "replay",
                f"the command was issued at {auth.issued_at:.0f}, before the oldest command this device still"
                f" remembers ({memory.floor:.0f}): it may be a replay",
            )
        memory.seen[auth.nonce] = (auth.issued_at, auth.expires_at)
        while len(memory.seen) > self.max_remembered:
            oldest = min(memory.seen, key=lambda n: memory.seen[n][0])
            memory.floor = max(memory.floor, memory.seen.pop(oldest)[0])
        try:
            self.store.save(memory)
        except OSError as exc:
            # Still refused in this run (the memory holds it); after a restart a replay within its validity
            # could pass. Refusing the command instead could lock a device with a full disk out of a rollback.
            log.error("cannot persist the command nonce (%s): replays are refused until the agent restarts", exc)
        return auth

    def _forget_expired(self, now: float) -> None:
        memory = self.memory
        expired = [n for n, (_, expires) in memory.seen.items() if expires <= now]
        for nonce in expired:
            # A forgotten command must stay refused even if this clock later goes back: raise the floor.
            memory.floor = max(memory.floor, memory.seen.pop(nonce)[0])

"""The agent's memory of accepted command nonces on disk (``agent.core.guard``), written durably."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from agent.core.guard import NonceMemory
from agent.deploy.fsutil import atomic_write

log = logging.getLogger(__name__)

FILE_NAME = "command-nonces.json"


class DiskNonceStore:
    """``data_dir/command-nonces.json``, replaced atomically (a crash leaves the old or the new memory)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE_NAME

    def load(self) -> NonceMemory:
        try:
            return NonceMemory.from_json(self.path.read_bytes())
        except FileNotFoundError:
            return NonceMemory()
        except (OSError, ValueError, TypeError, AttributeError, IndexError) as exc:
            # Never torn by atomic_write; damaged by something else. Refusing everything issued before now
            # keeps replays out (the controller re-sends what it still wants, sealed afresh).
            log.error("command nonces %s unreadable (%s): refusing commands issued before now", self.path, exc)
            return NonceMemory(floor=time.time())

    def save(self, memory: NonceMemory) -> None:
        atomic_write(self.path, memory.to_json())

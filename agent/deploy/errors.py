"""One exception hierarchy for the deployment side."""

from __future__ import annotations


class DeployError(Exception):
    """Base of every deployment error; the message says what was wrong and what to do."""


class StorageError(DeployError):
    """A slot cannot be read or written (disk full, I/O error, slot in use)."""


class InvalidTransition(DeployError):
    """An event that the transition table does not allow in the current state."""


class SelfTestError(DeployError):
    """A candidate model failed its self-test; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

"""The notification package's errors."""

from __future__ import annotations


class NotifyError(Exception):
    """A webhook request that cannot be carried out; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status

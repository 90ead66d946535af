"""The audit log: every write through the API, with who made it."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from controller.db.models import AuditEntry


def record(session: Session, actor: str, action: str, target: str, detail: dict[str, Any] | None = None) -> None:
    """Add an audit entry to ``session`` (committed with the change it describes)."""
    session.add(AuditEntry(actor=actor, action=action, target=target[:256], detail=detail or {}))

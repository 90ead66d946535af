"""What the controller knows about each device of each deployment, kept in memory and flushed in batches."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from controller.delivery.transitions import BEFORE_SWITCH, PENDING, SUCCESS, TERMINAL

__all__ = ["BEFORE_SWITCH", "PENDING", "SUCCESS", "TERMINAL", "Target", "deployment_status"]


@dataclass
class Target:
    deployment_id: str
    device_id: str
    artifact_id: str | None
    variant: str | None
    state: str = PENDING
    progress: float = 0.0
    chunks_have: int = 0
    chunks_total: int = 0
    contiguous: int = 0
    reason: str = ""
    previous: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    last_progress_at: float = 0.0
    last_command_at: float = 0.0
    #: the older artifact a rollback grant sent to this device names (it may fetch it again)
    rollback_artifact: str | None = None
    #: waiting for a free slot under the deployment's max_concurrent (no command sent yet)
    queued: bool = False
    #: it took part in a chunk broadcast of its artifact (once that went by, it repairs what it missed)
    broadcast_joined: bool = False
    dirty: bool = True

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def update(self, now: float, **values: Any) -> bool:
        """Apply changes; True when the state changed."""
        changed = "state" in values and values["state"] != self.state
        for key, value in values.items():
            setattr(self, key, value)
        self.updated_at = now
        if changed and self.state in TERMINAL:
            self.finished_at = now
        self.dirty = True
        return changed

    def row(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "progress": round(self.progress, 4),
            "chunks_have": self.chunks_have,
            "chunks_total": self.chunks_total,
            "reason": self.reason[:2000],
            "metrics": self.metrics,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "queued": self.queued,
            "started_at": self.started_at,
        }


def deployment_status(targets: list[Target], cancelled: bool = False) -> str:
    """running until every target ended; then completed, failed (some failed) or cancelled."""
    if cancelled and all(t.terminal for t in targets):
        return "cancelled"
    if not all(t.terminal for t in targets):
        return "running"
    if all(t.state == SUCCESS for t in targets):
        return "completed"
    return "failed"

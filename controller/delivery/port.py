"""What the rollout engine needs of the delivery (``DeliveryService``; a fake in the engine's unit tests)."""

from __future__ import annotations

from typing import Protocol

from controller.delivery.plan import DeploymentRequest
from controller.delivery.targets import Target


class Deliveries(Protocol):
    def create(self, request: DeploymentRequest, actor: str) -> str: ...

    def targets(self, deployment_id: str) -> list[Target]: ...

    def add_devices(self, deployment_id: str, device_ids: list[str]) -> list[str]: ...

    def activate(self, deployment_id: str) -> int: ...

    def commit(self, deployment_id: str) -> int: ...

    def rollback(self, deployment_id: str, actor: str, reason: str = "") -> int: ...

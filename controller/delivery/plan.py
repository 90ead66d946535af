"""Planning a deployment: which devices, which variant each gets, and the requests' errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from controller.db.models import Artifact, Device
from controller.delivery.targets import Target
from controller.delivery.variants import choose_variant
from controller.devices import selectors
from wire.messages import DeployState, ShadowSpec

#: why an artifact is marked corrupt in the store (None: it is not)
Corrupt = Callable[[str], str | None]


class DeploymentError(Exception):
    """A deployment request that cannot be carried out; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class DeploymentRequest:
    model: str
    version: int
    variant: str = "auto"
    device_ids: list[str] | None = None
    selector: str | None = None
    activate: bool = True
    shadow: ShadowSpec | None = None
    timeout_s: float = 3600.0
    rollout_id: str | None = None
    rollout_wave: int | None = None
    max_concurrent: int | None = None


def refuse_corrupt(artifacts: Sequence[Artifact], request: DeploymentRequest, corrupt: Corrupt) -> None:
    """409 when the variant asked for (or, with auto, every variant) is marked corrupt in the store."""
    damaged = {a.variant: (a.id, reason) for a in artifacts if (reason := corrupt(a.id))}
    if request.variant != "auto":
        hit = damaged.get(request.variant)
    else:
        hit = next(iter(damaged.values())) if len(damaged) == len(artifacts) else None
    if hit is not None:
        artifact_id, reason = hit
        raise DeploymentError(
            f"{request.model} v{request.version} ({request.variant}): artifact {artifact_id[:12]} is corrupt in"
            f" the controller's store ({reason}); repair it first: slmfleet model repair {artifact_id} FILE...",
            409,
        )


def resolve_devices(session: Session, request: DeploymentRequest) -> list[Device]:
    if bool(request.device_ids) == bool(request.selector):
        raise DeploymentError("give exactly one target: a list of device ids or a label selector")
    if request.device_ids:
        found = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(request.device_ids))).all()}
        missing = [d for d in request.device_ids if d not in found]
        if missing:
            raise DeploymentError(f"unknown devices: {', '.join(missing[:20])}", 404)
        revoked = [d for d in request.device_ids if found[d].revoked_at is not None]
        if revoked:
            raise DeploymentError(f"revoked devices: {', '.join(revoked[:20])}", 409)
        return [found[d] for d in dict.fromkeys(request.device_ids)]
    try:
        parsed = selectors.parse(request.selector)
    except selectors.SelectorError as exc:
        raise DeploymentError(str(exc)) from None
    devices = [
        d
        for d in session.exec(select(Device).where(col(Device.revoked_at).is_(None)).order_by(col(Device.id))).all()
        if parsed.matches(d.labels)
    ]
    if not devices:
        raise DeploymentError(f"no device matches the selector {request.selector!r}", 409)
    return devices


def variant_table(
    artifacts: Sequence[Artifact], corrupt: Callable[[str], str | None] = lambda _: None
) -> dict[str, dict[str, Any]]:
    """Each variant's artifact and requirements, as ``choose_variant`` takes them (corrupt ones left out)."""
    return {
        a.variant: {
            "artifact_id": a.id,
            "min_ram_bytes": a.signed_manifest["manifest"]["requirements"]["min_ram_bytes"],
            "min_disk_bytes": a.signed_manifest["manifest"]["requirements"].get("min_disk_bytes", 0),
        }
        for a in artifacts
        if corrupt(a.id) is None
    }


def new_target(
    deployment_id: str,
    device: Device,
    by_variant: dict[str, dict[str, Any]],
    rule: str,
    max_concurrent: int | None,
    now: float,
) -> Target:
    """A device's target in a deployment (failed at once when no variant fits); its row is not written here."""
    choice = choose_variant(device.hardware, by_variant, rule)
    previous = next((m for m in device.installed if m.get("active", True)), None)
    target = Target(
        deployment_id,
        device.id,
        choice.artifact_id,
        choice.variant,
        previous=previous,
        queued=choice.artifact_id is not None and max_concurrent is not None,
        started_at=now,
        updated_at=now,
    )
    if choice.artifact_id is None:
        target.update(now, state=DeployState.FAILED.value, reason=choice.reason)
    return target

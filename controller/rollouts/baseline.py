"""What a shadow step compares the candidate with, checked when the rollout is created.

On a device the shadow run compares the candidate with the model that device serves (``agent/deploy/shadow.py``),
not with anything the candidate was made from. For a derived version (distill, prune, finetune: ``lineage.parent``)
that is its parent only where the devices serve the parent; ``RolloutShadow.against = "parent"`` makes that a
condition of the rollout. Two checks refuse a shadow gate that could never decide:

* ``against="parent"`` and the candidate has no lineage parent, or targeted devices serve something else;
* an embeddings candidate whose vectors are not as wide as those of a model the devices serve: the cosine of
  vectors of different widths is undefined, the agent scores no sample, and the gate would wait until its deadline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from sqlmodel import Session, col, select

from controller.db.models import Artifact, Device, ModelVersion
from controller.db.models import Model as ModelRow
from controller.rollouts.plan import RolloutShadow


class BaselineError(ValueError):
    """The shadow gate cannot be run as asked (the message says why and what to do)."""


def _serving(device: Device) -> str | None:
    """``model@version`` of the model a device serves (the installed entry marked active), or None."""
    active = next((m for m in device.installed if m.get("active", True)), None)
    return f"{active['model']}@{active['version']}" if active else None


def _width(artifacts: Iterable[Artifact]) -> int | None:
    """The width of the embeddings a version's artifacts produce (last dimension of the first output), if fixed."""
    for a in artifacts:
        outputs = a.signed_manifest.get("manifest", {}).get("io", {}).get("outputs") or []
        shape = outputs[0].get("shape") if outputs else None
        if shape and isinstance(shape[-1], int):
            return int(shape[-1])
    return None


def _version_width(session: Session, ref: str) -> tuple[str | None, int | None]:
    """The task and embeddings width of ``model@version`` (None, None when the registry does not hold it)."""
    name, _, number = ref.rpartition("@")
    row = session.exec(
        select(ModelVersion, ModelRow)
        .join(ModelRow, col(ModelRow.id) == col(ModelVersion.model_id))
        .where(ModelRow.name == name, ModelVersion.number == int(number))
    ).first()
    if row is None:
        return None, None
    version, model = row
    return model.task, _width(session.exec(select(Artifact).where(Artifact.version_id == version.id)).all())


def _summary(counts: Counter[str]) -> str:
    return ", ".join(f"{ref} on {n}" for ref, n in counts.most_common())


def check(
    session: Session, model: ModelRow, version: ModelVersion, devices: list[Device], shadow: RolloutShadow
) -> str:
    """Refuse (BaselineError) a shadow gate that cannot decide; else say what the shadow compares with."""
    candidate = f"{model.name}@{version.number}"
    parent: str | None = (version.lineage or {}).get("parent")
    counts = Counter(_serving(d) or "nothing" for d in devices)
    if shadow.against == "parent":
        if parent is None:
            raise BaselineError(
                f"shadow against the parent: {candidate} is not a derived version (it has no lineage parent); "
                "leave shadow.against at 'active' to compare with what the devices serve"
            )
        others = Counter({ref: n for ref, n in counts.items() if ref != parent})
        if others:
            raise BaselineError(
                f"shadow against the parent {parent}: {others.total()} of the {len(devices)} targeted devices do not "
                f"serve it ({_summary(others)}), and a shadow run compares with what each device serves; deploy "
                f"{parent} to them first, or narrow the selector to the devices that serve it"
            )
    if model.task == "embeddings":
        width = _width(session.exec(select(Artifact).where(Artifact.version_id == version.id)).all())
        for ref in counts:
            if ref == "nothing":
                continue
            task, served = _version_width(session, ref)
            if task == "embeddings" and width is not None and served is not None and served != width:
                raise BaselineError(
                    f"the shadow gate cannot compare {candidate}'s embeddings ({width} wide) with those of {ref} "
                    f"({served} wide), which {counts[ref]} targeted devices serve: the cosine of vectors of different "
                    "widths is undefined, so no device would report a sample and the gate would wait until its "
                    f"deadline; roll out without shadow, or a version as wide as {ref} (a distilled embeddings student "
                    "is when it keeps the teacher's hidden size: leave hidden= out of its shape)"
                )
    if parent is None:
        return f"shadow compares with what each device serves: {_summary(counts)}"
    if set(counts) == {parent}:
        return f"shadow compares with the lineage parent {parent}, which all {len(devices)} devices serve"
    return (
        f"shadow compares with what each device serves ({_summary(counts)}), not only with the lineage parent "
        f"{parent}: ask for shadow against='parent' to require it"
    )

"""From a scenario to the list of virtual devices: profiles by share, tags, faults, factory installs.

Everything here is deterministic for a scenario's seed, so a run can be repeated device for device.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from simulations.errors import ScenarioError
from simulations.scenario import DeviceSelect, Profile, Scenario, amount

MB = 1_000_000
MIB = 1 << 20


@dataclass
class DeviceSpec:
    """One virtual device, as the worker process builds it (picklable)."""

    id: str
    profile: str
    cpu_speed: float
    cpu_count: int
    ram_bytes: int
    disk_bytes: int
    disk_mbps: float
    arch: str
    os: str
    labels: dict[str, str]
    inference_rate: float
    real_onnx: bool = False
    #: runs as a real agent process (``simulations.device.agents``), not in a worker
    real_agent: bool = False
    #: faults of this device: the scenario's fault dicts (kind and parameters), resolved
    faults: list[dict[str, Any]] = field(default_factory=list)
    #: the artifact installed at the factory (None: no model)
    installed_artifact: str | None = None
    #: a fixed per-device speed variation (log-normal around 1)
    speed_jitter: float = 1.0

    def hardware(self) -> dict[str, Any]:
        """The hardware profile as the controller reads it from the birth message."""
        return {"ram_bytes": self.ram_bytes, "disk_free_bytes": self.disk_bytes, "cpu_count": self.cpu_count}


def _rng(seed: int, *parts: object) -> random.Random:
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def profile_counts(profiles: list[Profile], total: int) -> list[int]:
    """Devices per profile: each its share (rounded), the last profile takes the rest."""
    counts: list[int] = []
    left = total
    for i, p in enumerate(profiles):
        n = left if i == len(profiles) - 1 else min(left, amount(p.share, total))
        counts.append(n)
        left -= n
    return counts


def select(devices: list[DeviceSpec], sel: DeviceSelect, seed: int, salt: str) -> list[DeviceSpec]:
    """The devices ``sel`` names, in a stable random order of the seed (a share rounds up)."""
    wanted = {sel.profile} if isinstance(sel.profile, str) else set(sel.profile or [])
    pool = [
        d
        for d in devices
        if (not wanted or d.profile in wanted)
        and (sel.labels is None or all(d.labels.get(k) == v for k, v in sel.labels.items()))
        and (sel.ids is None or d.id in sel.ids)
    ]
    if sel.share is None and sel.count is None:
        return pool
    groups: dict[str, list[DeviceSpec]] = {}
    if sel.per_profile:
        for d in pool:
            groups.setdefault(d.profile, []).append(d)
    else:
        groups[""] = pool
    chosen: list[DeviceSpec] = []
    for name, group in groups.items():
        order = sorted(group, key=lambda d: hashlib.sha256(f"{seed}:{salt}:{d.id}".encode()).hexdigest())
        n = sel.count if sel.count is not None else amount(sel.share or "0", len(order))
        if sel.per_profile and sel.share is not None and n == 0 and order and float(sel.share.rstrip("%")) > 0:
            n = 1
        chosen.extend(order[:n])
        del name
    return chosen


def spread(total: int, n: int) -> list[int]:
    """``n`` indices evenly spaced over ``total`` devices (ordered by profile: each profile gets its share)."""
    n = min(n, total)
    return [int(i * total / n) for i in range(n)] if n else []


def resolve_ram(profile: Profile, variants: dict[tuple[str, str, str], dict[str, Any]]) -> int:
    """The RAM of a profile: ``ram_mb``, or between the named variant's need and the next larger one's."""
    if profile.ram_fits is None:
        assert profile.ram_mb is not None
        return int(profile.ram_mb * MIB)
    fit = profile.ram_fits
    needs = {
        v: info["min_ram_bytes"] for (m, ver, v), info in variants.items() if m == fit.model and ver == str(fit.version)
    }
    if fit.variant not in needs:
        raise ScenarioError(
            f"profile {profile.name}: ram_fits names {fit.model} {fit.version} {fit.variant}, which was not"
            f" registered (variants: {sorted(needs)})"
        )
    own = needs[fit.variant]
    larger = sorted(n for v, n in needs.items() if n > own)
    smaller = [v for v, n in needs.items() if n < own]
    if smaller:
        raise ScenarioError(
            f"profile {profile.name}: the {fit.variant} variant needs {own >> 20} MiB, more than {smaller}: a device"
            f" that fits it fits those too (the registry measured { ({v: n >> 20 for v, n in needs.items()}) } MiB)"
        )
    return (own + larger[0]) // 2 if larger else int(own * 1.05)


def build_fleet(
    scenario: Scenario,
    *,
    variants: dict[tuple[str, str, str], dict[str, Any]] | None = None,
    versions: dict[tuple[str, str], int] | None = None,
) -> list[DeviceSpec]:
    """The scenario's devices with their profiles, tags and faults.

    ``variants`` maps (model, version key, variant) to {artifact_id, min_ram_bytes, min_disk_bytes} of the
    registered artifacts (for ``ram_fits`` and the factory install); ``versions`` maps (model, key) to the
    version number the controller gave it.
    """
    fleet = scenario.fleet
    variants = variants or {}
    versions = versions or {}
    counts = profile_counts(fleet.profiles, fleet.devices)
    width = max(5, len(str(fleet.devices)))
    devices: list[DeviceSpec] = []
    index = 0
    for profile, n in zip(fleet.profiles, counts, strict=True):
        ram = resolve_ram(profile, variants)
        real_left = min(profile.real_onnx, n)
        for _ in range(n):
            rng = _rng(scenario.seed, "device", index)
            devices.append(
                DeviceSpec(
                    id=f"{fleet.prefix}-{index:0{width}d}",
                    profile=profile.name,
                    cpu_speed=profile.cpu_speed,
                    cpu_count=profile.cpu_count,
                    ram_bytes=ram,
                    disk_bytes=int(profile.disk_mb * MIB),
                    disk_mbps=profile.disk_mbps,
                    arch=profile.arch,
                    os=profile.os,
                    labels={"profile": profile.name, **profile.labels},
                    inference_rate=profile.inference_rate
                    if profile.inference_rate is not None
                    else fleet.inference_rate,
                    real_onnx=real_left > 0,
                    speed_jitter=rng.lognormvariate(0.0, 0.08),
                )
            )
            real_left -= 1
            index += 1
    for i in spread(len(devices), fleet.real_agents):
        devices[i].real_agent = True
        devices[i].real_onnx = False
    for i, tag in enumerate(fleet.tags):
        for d in select(devices, tag.devices, scenario.seed, f"tag{i}"):
            d.labels.update(tag.labels)
    for i, fault in enumerate(scenario.faults):
        body = fault.model_dump(mode="json", exclude={"devices"})
        body["id"] = i
        if body["kind"] == "model_crash":
            key = str(body["version"]) if isinstance(body["version"], str) else f"v{body['version']}"
            body["version_number"] = versions.get((body["model"], key))
        for d in select(devices, fault.devices, scenario.seed, f"fault{i}"):
            d.faults.append(body)
    installed = fleet.installed
    if installed is not None:
        _factory_install(scenario, devices, variants)
    return devices


def _factory_install(
    scenario: Scenario, devices: list[DeviceSpec], variants: dict[tuple[str, str, str], dict[str, Any]]
) -> None:
    """Pick each device's variant of the installed version the way the controller would."""
    from controller.delivery.variants import choose_variant

    installed = scenario.fleet.installed
    assert installed is not None
    key = str(installed.version) if isinstance(installed.version, str) else f"v{installed.version}"
    by_variant = {v: info for (m, k, v), info in variants.items() if m == installed.model and k == key}
    if not by_variant:
        raise ScenarioError(f"the installed version {installed.model} {key} has no registered artifacts")
    for d in devices:
        if d.real_onnx or d.real_agent:
            continue  # real files cannot be conjured: the runner deploys the installed version to these
        choice = choose_variant(d.hardware(), by_variant)
        if choice.artifact_id is None:
            raise ScenarioError(
                f"device {d.id} ({d.profile}): nothing of {installed.model} {key} fits: {choice.reason}"
            )
        d.installed_artifact = choice.artifact_id


def chunks_of(devices: list[DeviceSpec], processes: int) -> list[list[DeviceSpec]]:
    """Split the fleet over ``processes`` workers, profiles spread evenly (round robin)."""
    buckets: list[list[DeviceSpec]] = [[] for _ in range(max(1, processes))]
    for i, d in enumerate(devices):
        buckets[i % len(buckets)].append(d)
    return [b for b in buckets if b]

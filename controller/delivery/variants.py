"""Which variant of a version each device gets, from its hardware profile and the manifests' requirements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Preference when the operator does not name a variant: int8 is the edge default (about as accurate as
#: fp32, a quarter of the size, faster); fp32 where int8 was refused; int4 where nothing else fits.
AUTO_ORDER = ("int8", "fp16", "fp32", "int4")


@dataclass(frozen=True)
class VariantChoice:
    artifact_id: str | None
    variant: str | None
    reason: str


def choose_variant(hardware: dict[str, Any], artifacts: dict[str, dict[str, Any]], rule: str = "auto") -> VariantChoice:
    """Pick a variant for a device.

    ``artifacts`` maps variant name to ``{"artifact_id", "min_ram_bytes", "min_disk_bytes"}``.
    ``rule`` is "auto" or a variant name; a named variant is given even if the device looks too small
    for it (the operator asked), but the reason says so.
    """
    ram = int(hardware.get("ram_bytes") or 0)
    disk = hardware.get("disk_free_bytes")
    if rule != "auto":
        art = artifacts.get(rule)
        if art is None:
            return VariantChoice(
                None, None, f"this version has no {rule} variant (it has {', '.join(sorted(artifacts))})"
            )
        note = ""
        if ram and art["min_ram_bytes"] > ram:
            note = f" (needs {art['min_ram_bytes'] >> 20} MiB RAM, device has {ram >> 20} MiB)"
        return VariantChoice(art["artifact_id"], rule, f"{rule} as requested{note}")
    ordered = [v for v in AUTO_ORDER if v in artifacts] + sorted(v for v in artifacts if v not in AUTO_ORDER)
    for variant in ordered:
        art = artifacts[variant]
        fits_ram = not ram or art["min_ram_bytes"] <= ram
        fits_disk = disk is None or art.get("min_disk_bytes", 0) <= disk
        if fits_ram and fits_disk:
            return VariantChoice(
                art["artifact_id"], variant, f"{variant}: fits {ram >> 20} MiB RAM" if ram else variant
            )
    if not artifacts:
        return VariantChoice(None, None, "this version has no variants")
    least_ram = min(a["min_ram_bytes"] for a in artifacts.values())
    least_disk = min(a.get("min_disk_bytes", 0) for a in artifacts.values())
    short = []
    if ram and least_ram > ram:
        short.append(f"the smallest needs {least_ram >> 20} MiB RAM, the device has {ram >> 20} MiB")
    if disk is not None and least_disk > disk:
        short.append(f"the smallest needs {least_disk >> 20} MiB of disk, the device has {int(disk) >> 20} MiB free")
    if not short:  # each fits one way but none both ways
        short.append(f"none fits both its {ram >> 20} MiB RAM and {int(disk or 0) >> 20} MiB of free disk")
    return VariantChoice(None, None, "no variant fits this device: " + "; ".join(short))

"""The rollout form: flat HTML fields to a ``RolloutCreate``, with errors a person can act on."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from controller.rollouts.plan import GateSpec, RolloutCreate

#: what the form shows before anything was typed (the engine's default plan, as text)
_GATE_DEFAULTS = GateSpec().model_dump(
    include={
        "error_rate_max",
        "p95_latency_ratio_max",
        "rss_ratio_max",
        "min_samples",
        "confidence",
        "warmup_s",
        "deadline_s",
    }
)
DEFAULTS: dict[str, str] = {
    "ref": "",
    "variant": "auto",
    "selector": "",
    "waves": "1%, 10%, 50%, 100%",
    "canary_selector": "",
    "bake_s": "60",
    "success_threshold": "100",
    "failure_threshold": "10%",
    "max_concurrent": "",
    "device_timeout_s": "1800",
    "require_approval": "",
    # the gates' defaults are the API's (chosen from ``python -m benchmarks gates``)
    **{k: f"{v:g}" for k, v in _GATE_DEFAULTS.items()},
    "shadow": "",
    "shadow_sample_rate": "0.2",
    "shadow_min_samples": "50",
    "shadow_agreement_min": "0.95",
    "shadow_against": "active",
    "start_at": "",
    "late_devices": "current",
    "description": "",
}


class FormError(ValueError):
    """The form cannot become a rollout; ``errors`` maps a field to what is wrong with it."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def values_from(form: Mapping[str, Any]) -> dict[str, str]:
    """The form's fields as strings, defaults for the missing ones (checkboxes are absent when unticked)."""
    out = {k: str(form.get(k, "" if k in ("require_approval", "shadow") else v)).strip() for k, v in DEFAULTS.items()}
    return out


def _optional_float(values: dict[str, str], name: str, errors: dict[str, str]) -> float | None:
    text = values[name]
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        errors[name] = "a number, or empty to turn it off"
        return None


def _int(values: dict[str, str], name: str, errors: dict[str, str]) -> int | None:
    text = values[name]
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        errors[name] = "a whole number"
        return None


def to_rollout(values: dict[str, str]) -> RolloutCreate:
    """Build and validate the rollout; raises ``FormError`` naming each bad field."""
    errors: dict[str, str] = {}
    model, _, version = values["ref"].partition("@")
    if not model or not version.isdigit():
        errors["ref"] = "choose a model version"
    untils = [u.strip() for u in values["waves"].split(",") if u.strip()]
    if not untils:
        errors["waves"] = "list at least one wave, e.g. 1, 10%, 100%"
    numbers = {
        n: _optional_float(values, n, errors)
        for n in (
            "bake_s",
            "success_threshold",
            "device_timeout_s",
            "error_rate_max",
            "p95_latency_ratio_max",
            "rss_ratio_max",
            "deadline_s",
            "confidence",
            "warmup_s",
            "shadow_sample_rate",
            "shadow_agreement_min",
        )
    }
    ints = {n: _int(values, n, errors) for n in ("max_concurrent", "min_samples", "shadow_min_samples")}
    start_at = None
    if values["start_at"]:
        try:
            start_at = datetime.fromisoformat(values["start_at"]).replace(tzinfo=UTC)
        except ValueError:
            errors["start_at"] = "a date and time (UTC), e.g. 2026-12-01T02:00"
    if errors:
        raise FormError(errors)
    waves: list[dict[str, Any]] = []
    for i, until in enumerate(untils):
        last = i == len(untils) - 1
        wave: dict[str, Any] = {
            "name": "canary" if i == 0 and len(untils) > 1 else None,
            "until": until,
            "failure_threshold": values["failure_threshold"] or "10%",
            "require_approval": bool(values["require_approval"]) and not last,
        }
        if i == 0 and values["canary_selector"]:
            wave["selector"] = values["canary_selector"]
        for key in ("bake_s", "success_threshold", "device_timeout_s"):
            if numbers[key] is not None:
                wave[key] = numbers[key]
        if ints["max_concurrent"] is not None:
            wave["max_concurrent"] = ints["max_concurrent"]
        waves.append(wave)
    gates: dict[str, Any] = {k: numbers[k] for k in ("error_rate_max", "p95_latency_ratio_max", "rss_ratio_max")}
    gates["shadow_agreement_min"] = numbers["shadow_agreement_min"]
    if ints["min_samples"] is not None:
        gates["min_samples"] = ints["min_samples"]
    for key in ("deadline_s", "confidence", "warmup_s"):
        if numbers[key] is not None:
            gates[key] = numbers[key]
    body: dict[str, Any] = {
        "model": model,
        "version": int(version),
        "variant": values["variant"] or "auto",
        "selector": values["selector"],
        "waves": waves,
        "gates": gates,
        "start_at": start_at,
        "late_devices": values["late_devices"] or "current",
        "description": values["description"],
    }
    if values["shadow"]:
        shadow: dict[str, Any] = {}
        if numbers["shadow_sample_rate"] is not None:
            shadow["sample_rate"] = numbers["shadow_sample_rate"]
        if ints["shadow_min_samples"] is not None:
            shadow["min_samples"] = ints["shadow_min_samples"]
        if values["shadow_against"]:
            shadow["against"] = values["shadow_against"]
        body["shadow"] = shadow
    try:
        return RolloutCreate.model_validate(body)
    except ValidationError as exc:
        raise FormError(_field_errors(exc)) from None


#: where a validation error of the model shows in the form
_FIELD_OF: dict[tuple[str, ...], str] = {
    ("model",): "ref",
    ("version",): "ref",
    ("variant",): "variant",
    ("selector",): "selector",
    ("start_at",): "start_at",
    ("late_devices",): "late_devices",
    ("description",): "description",
}


def _field_errors(exc: ValidationError) -> dict[str, str]:
    errors: dict[str, str] = {}
    for e in exc.errors():
        loc: tuple[str, ...] = tuple(str(p) for p in e["loc"])
        if loc[:1] == ("waves",):
            name = loc[2] if len(loc) > 2 else "waves"
            field = {"until": "waves", "selector": "canary_selector"}.get(name, name)
        elif loc[:1] == ("gates",):
            field = loc[1] if len(loc) > 1 else "error_rate_max"
        elif loc[:1] == ("shadow",):
            field = {
                "sample_rate": "shadow_sample_rate",
                "min_samples": "shadow_min_samples",
                "against": "shadow_against",
            }.get(loc[1] if len(loc) > 1 else "", "shadow")
        else:
            field = _FIELD_OF.get(loc[:1], "form")
        message = str(e["msg"]).removeprefix("Value error, ")
        errors.setdefault(field, message)
    return errors

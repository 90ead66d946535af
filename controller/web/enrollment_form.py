"""The enrollment-token form: flat HTML fields to the API's ``EnrollmentTokenCreate``, with errors per field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from controller.enrollment.schemas import MAX_HOURS, EnrollmentTokenCreate
from controller.web.forms import FormError

FIELDS = ("labels", "device_id", "expires_in_hours", "note")

#: messages a person can act on, in place of the schema's regular expressions
_MESSAGES = {
    "device_id": "a device id has 1-128 characters from A-Z a-z 0-9 . _ : - and starts with a letter or digit",
    "expires_in_hours": f"a number of hours above 0 and at most {MAX_HOURS} (a year)",
    "note": "at most 256 characters",
}


def values_from(form: Mapping[str, Any], default_hours: float) -> dict[str, str]:
    """The form's fields as stripped strings; the controller's default lifetime when none was typed."""
    values = {name: str(form.get(name, "")).strip() for name in FIELDS}
    if not values["expires_in_hours"]:
        values["expires_in_hours"] = f"{default_hours:g}"
    return values


def parse_labels(text: str) -> dict[str, str]:
    """``site=berlin, tier=canary`` to a dict; raises ValueError naming the first bad part."""
    labels: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"{part!r} is not key=value: write labels as key=value, key=value")
        if key in labels:
            raise ValueError(f"label {key!r} is given twice")
        labels[key] = value
    return labels


def to_request(values: dict[str, str]) -> EnrollmentTokenCreate:
    """Build and validate the request; raises ``FormError`` naming each bad field (all of them at once)."""
    errors: dict[str, str] = {}
    body: dict[str, Any] = {"note": values["note"], "device_id": values["device_id"] or None}
    try:
        body["labels"] = parse_labels(values["labels"])
    except ValueError as exc:
        errors["labels"] = str(exc)
    try:
        hours = float(values["expires_in_hours"])
    except ValueError:
        hours = math.nan
    if math.isfinite(hours):
        body["expires_in_hours"] = hours
    else:
        errors["expires_in_hours"] = _MESSAGES["expires_in_hours"]
    try:
        request = EnrollmentTokenCreate.model_validate(body)
    except ValidationError as exc:
        raise FormError({**_field_errors(exc), **errors}) from None
    if errors:  # the fields left out above were the bad ones
        raise FormError(errors)
    return request


def _field_errors(exc: ValidationError) -> dict[str, str]:
    errors: dict[str, str] = {}
    for e in exc.errors():
        field = str(e["loc"][0]) if e["loc"] else "form"
        if e["loc"] == ("labels",):
            message = "at most 64 labels" if e["type"] == "too_long" else str(e["msg"])
        elif field == "labels":
            # loc is ("labels", key) or ("labels", key, "[key]"): say which label, and what labels may hold
            key = str(e["loc"][1]) if len(e["loc"]) > 1 else ""
            what = "key" if e["loc"][-1] == "[key]" else "value"
            message = (
                f"label {key!r}: the {what} may hold up to 63 characters from A-Z a-z 0-9 . _ -"
                f"{' /' if what == 'key' else ''} and must start and end with a letter or digit"
                if e["type"] in ("string_pattern_mismatch", "string_too_long", "string_too_short")
                else str(e["msg"])
            )
        else:
            message = _MESSAGES.get(field, str(e["msg"]))
        errors.setdefault(field if field in FIELDS else "form", message)
    return errors

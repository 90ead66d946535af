"""The deploy form: flat HTML fields to the API's ``DeploymentCreate``, with errors per field."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from controller.api.schemas import DeploymentCreate
from controller.web.forms import FormError

DEFAULTS: dict[str, str] = {
    "ref": "",
    "variant": "auto",
    "selector": "",
    "devices": "",
    "timeout_s": "3600",
    "activate": "1",
}
FIELDS = tuple(DEFAULTS)


def values_from(form: Mapping[str, Any], *, submitted: bool) -> dict[str, str]:
    """The form's fields as strings; an unticked checkbox is absent from a submitted form."""
    values = {k: str(form.get(k, v)).strip() for k, v in DEFAULTS.items()}
    if submitted and "activate" not in form:
        values["activate"] = ""
    return values


def device_list(text: str) -> list[str]:
    """Device ids separated by commas, spaces or new lines."""
    return [d for d in re.split(r"[\s,]+", text) if d]


def to_request(values: dict[str, str]) -> DeploymentCreate:
    """Build and validate the request (the same model the REST API validates); FormError names each bad field."""
    errors: dict[str, str] = {}
    model, _, version = values["ref"].partition("@")
    if not model or not version.isdigit():
        errors["ref"] = "choose a model version"
    devices = device_list(values["devices"])
    if bool(devices) == bool(values["selector"]):
        errors["selector"] = "give a label selector or a list of device ids (one of them)"
    try:
        timeout = float(values["timeout_s"] or "3600")
    except ValueError:
        errors["timeout_s"] = "a number of seconds"
        timeout = 3600.0
    if errors:
        raise FormError(errors)
    body: dict[str, Any] = {
        "model": model,
        "version": int(version),
        "variant": values["variant"] or "auto",
        "timeout_s": timeout,
        "activate": bool(values["activate"]),
    }
    if devices:
        body["devices"] = devices
    else:
        body["selector"] = values["selector"]
    try:
        return DeploymentCreate.model_validate(body)
    except ValidationError as exc:
        raise FormError(_field_errors(exc)) from None


def _field_errors(exc: ValidationError) -> dict[str, str]:
    where = {"model": "ref", "version": "ref", "variant": "variant", "timeout_s": "timeout_s", "devices": "devices"}
    errors: dict[str, str] = {}
    for e in exc.errors():
        field = where.get(str(e["loc"][0]) if e["loc"] else "", "form")
        message = str(e["msg"]).removeprefix("Value error, ")
        if field == "timeout_s":
            message = "seconds above 0, at most 30 days (2592000)"
        errors.setdefault(field, message)
    return errors

"""The model upload form: its fields merged into the import options the REST API takes as JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from controller.web.forms import FormError
from wire.manifest import Task

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FIELDS = ("model", "task", "description", "options")
VARIANTS = ("fp32", "int8", "int4")
TASKS = tuple(t.value for t in Task)


def values_from(form: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {k: str(form.get(k, "")).strip() for k in FIELDS}
    values["variants"] = [v for v in VARIANTS if form.get(f"variant_{v}")]
    return values


def options_json(values: dict[str, Any]) -> str:
    """The options as the API takes them: the JSON field, with the task, description and variants chosen in
    the form on top. FormError names the field that is wrong; the import checks the rest, as for the API."""
    errors: dict[str, str] = {}
    if not NAME.match(values["model"]):
        errors["model"] = "a model name: letters, digits and . _ - (at most 128), starting with a letter or digit"
    options: dict[str, Any] = {}
    if values["options"]:
        try:
            loaded = json.loads(values["options"])
        except json.JSONDecodeError as exc:
            errors["options"] = f"not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        else:
            if isinstance(loaded, dict):
                options = loaded
            else:
                errors["options"] = "a JSON object, e.g. {\"labels\": [\"negative\", \"positive\"]}"
    if values["task"] and values["task"] not in TASKS:
        errors["task"] = f"one of {', '.join(TASKS)}"
    if errors:
        raise FormError(errors)
    if values["task"]:
        options["task"] = values["task"]
    if values["description"]:
        options["description"] = values["description"]
    if values["variants"]:
        options["variants"] = values["variants"]
    return json.dumps(options)

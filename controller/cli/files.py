"""Reading the JSON files operators give the CLI (rollout plans, import options) with one-line errors."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ValidationError

from controller.cli import exits


def usage_error(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr; raise the result (exit code 2)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(exits.USAGE)


def read_json_object(path: Path, what: str, example: str) -> dict[str, Any]:
    """The JSON object in ``path``; a missing file, a syntax error or another JSON type is a usage error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise usage_error(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise usage_error(f"{what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise usage_error(f"{what} {path}: not a text file (a JSON object is expected)") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise usage_error(f"{what} {path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(value, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise usage_error(f"{what} {path}: the file holds {kind}; it must be a JSON object, e.g. {example}")
    return value


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's annotation (``X | None``, ``list[X]``, ``Annotated[X, ...]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def explain(error: Any, model: type[BaseModel] | None = None) -> str:
    """One pydantic (or FastAPI 422) error as ``field.path: what is wrong (what is allowed)``."""
    if not isinstance(error, dict):
        return str(error)
    loc = [p for p in error.get("loc", ()) if p not in ("body", "query", "path")]
    kind = error.get("type", "")
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    current, field, allowed = model, None, ""
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: the same model
        if current is not None and part in current.model_fields:
            field = current.model_fields[part]
            current = _model_in(field.annotation)
        else:
            if kind == "extra_forbidden" and current is not None:
                allowed = ", ".join(current.model_fields)
            break
    path = ".".join(str(p) for p in loc) or "(top level)"
    if kind == "extra_forbidden":
        return f"{path}: unknown field" + (f"; allowed: {allowed}" if allowed else "")
    given = error.get("input")
    if kind != "missing" and isinstance(given, str | int | float | bool) and len(repr(given)) <= 60:
        message += f", got {json.dumps(given)}"
    if field is not None and field.description and kind != "missing":
        message += f" ({field.description})"
    return f"{path}: {message}"


def validate(model: type[BaseModel], data: dict[str, Any], what: str) -> None:
    """Check ``data`` against ``model``; the first problems become one usage error line."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        problems = [explain(e, model) for e in exc.errors(include_url=False)]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise usage_error(f"{what}: " + "; ".join(problems[:3]) + more) from None

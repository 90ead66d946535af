"""The REST API's OpenAPI document, made true: every status code a route answers is declared, with its body.

FastAPI declares what a route returns on success and a 422 for its parameters. The rest is added
here, from what each route depends on, so a new route gets them without anyone remembering:

- 401 for routes that read a bearer token (reads too: a token that is presented is checked), and 403
  for routes that need the operator or admin role;
- 404 for routes with a path parameter (they look something up), 409 for those whose id may be given as a
  prefix (``ids.PREFIX_PARAMS``: a prefix several ids start with), 400 for routes with a JSON body
  (a body that is not UTF-8 cannot be parsed), 429 for every route (the rate limit);
- 422 with :class:`ValidationFailed`: pydantic's list of field errors, or one sentence where a route
  checks more than the schema can say (a selector that does not parse).

What only one route answers (409, 413, 503, a 202) is declared on that route with :func:`errors`.
Dicts with constrained keys (labels) are rewritten from ``patternProperties`` to ``propertyNames``,
so a key that breaks the pattern is invalid in the schema as it is in the API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from controller.api import deps, ids


class ApiError(BaseModel):
    """Every refusal the API answers: one sentence that says what was wrong and what to do."""

    detail: str = Field(description="what was wrong and what to do")


class FieldError(BaseModel):
    """One field the request got wrong (pydantic's error)."""

    loc: list[str | int] = Field(description="where: body, query, path or header, then the field's path")
    msg: str
    type: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class ValidationFailed(BaseModel):
    """422: the request does not fit the schema (a list of field errors), or a value the route checks
    beyond the schema does not hold (one sentence, e.g. a label selector that does not parse)."""

    detail: list[FieldError] | str


#: what each added status code means, for the document
DESCRIPTIONS = {
    400: "the body could not be parsed (not UTF-8 JSON)",
    401: "no token, or a token that is unknown, expired or revoked",
    403: "the token's role is too low for this",
    404: "not found: a name, id or version in the request does not exist",
    409: "valid, but the current state refuses it, or an id prefix that several ids start with (the reason says which)",
    413: "the upload is larger than upload_max_bytes",
    422: "the request does not fit the schema, or a value checked beyond it does not hold",
    429: "too many requests from this address or with this token: wait Retry-After seconds",
    503: "a part the request needs (the broker, the database) is not available now",
}


def errors(*codes: int, **described: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: ``errors(409, 503)``; a code given as ``_409="..."`` gets its own words."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ApiError, "description": DESCRIPTIONS[code]}
    for key, text in described.items():
        out[int(key.lstrip("_"))] = {"model": ApiError, "description": text}
    return out


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _calls(sub)


def implied_codes(route: APIRoute) -> set[int]:
    """The status codes a route answers because of what it depends on (see the module's docstring)."""
    calls = set(_calls(route.dependant))
    codes = {429}
    if calls & {deps.operator_principal, deps.admin_principal}:
        codes |= {401, 403}
    elif deps.reader_principal in calls:
        codes.add(401)
    if route.dependant.path_params:
        codes.add(404)
        if {p.name for p in route.dependant.path_params} & ids.PREFIX_PARAMS:
            codes.add(409)  # an id prefix that several ids start with
    if route.body_field is not None:
        codes.add(400)
    if route.body_field is not None or route.dependant.query_params or route.dependant.path_params:
        codes.add(422)
    return codes


def _error_ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}


def _rewrite_pattern_properties(node: Any) -> None:
    """``patternProperties`` (which lets any other key through) becomes ``propertyNames`` + ``additionalProperties``."""
    if isinstance(node, dict):
        patterns = node.get("patternProperties")
        if isinstance(patterns, dict) and len(patterns) == 1 and "additionalProperties" not in node:
            pattern, value_schema = next(iter(patterns.items()))
            del node["patternProperties"]
            node["propertyNames"] = {**node.get("propertyNames", {}), "pattern": pattern}
            node["additionalProperties"] = value_schema
        for value in node.values():
            _rewrite_pattern_properties(value)
    elif isinstance(node, list):
        for value in node:
            _rewrite_pattern_properties(value)


def build(app: FastAPI, routers: Sequence[APIRouter]) -> dict[str, Any]:
    """The document for ``app``: FastAPI's, with the declarations above for the routes of ``routers``."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
        servers=app.servers,
        separate_input_output_schemas=app.separate_input_output_schemas,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ApiError, ValidationFailed):
        definitions = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(definitions.pop("$defs", {}))
        components[model.__name__] = definitions
    # the routers' own routes, not app.routes: how FastAPI keeps included routes there changes between versions
    for route in (r for router in routers for r in router.routes):
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        codes = implied_codes(route)
        for method in route.methods or ():
            operation = schema["paths"][route.path_format][method.lower()]
            responses = operation.setdefault("responses", {})
            for code in sorted(codes):
                responses.setdefault(str(code), {"description": DESCRIPTIONS[code], "content": _error_ref(ApiError)})
            if "422" in responses:
                said = responses["422"].get("description")
                description = said if said and said != "Validation Error" else DESCRIPTIONS[422]  # FastAPI's words
                responses["422"] = {"description": description, "content": _error_ref(ValidationFailed)}
            if "429" in responses:
                responses["429"]["headers"] = {
                    "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer", "minimum": 1}}
                }
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    _rewrite_pattern_properties(schema)
    return schema


def install(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """Serve :func:`build`'s document at ``/openapi.json`` (built once, on the first request).

    ``routers`` are the API's routers, included in ``app`` without a further prefix.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, routers)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

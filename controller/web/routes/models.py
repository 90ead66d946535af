"""The model registry: versions, variants, sizes, agreement, latency, and who serves them."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from controller.web import queries
from controller.web.deps import UserDep, runtime_of
from controller.web.render import page

router = APIRouter(include_in_schema=False)


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, who: UserDep) -> Response:
    with runtime_of(request).engine.connect() as conn:
        listing = queries.models_overview(conn)
    return page(request, "models.html", {"title": "Models", "nav": "models", "models": listing})

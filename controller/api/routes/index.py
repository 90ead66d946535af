"""``GET /api/v1``: what the API offers, so the URL ``slmfleet up`` prints answers with links instead of a 404."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from agent import __version__

router = APIRouter(tags=["health"])

PREFIX = "/api/v1"
#: each collection of the API and what it holds
RESOURCES = {
    "health": "database and broker status, device counts",
    "cluster": "controller replicas sharing the database, and the leases: which replica drives what",
    "devices": "the fleet: presence, hardware, labels, installed models; telemetry and events per device",
    "models": "the model registry: versions and their variants (upload with POST /models/{name}/versions)",
    "deployments": "a model version sent to devices, with per-device state",
    "rollouts": "a model version rolled out in waves, gated on inference metrics",
    "signing-key": "the public key devices pin to verify manifests",
    "enrollment-tokens": "single-use tokens devices join with (admin)",
    "tokens": "API tokens (admin)",
    "users": "dashboard users (admin)",
    "webhooks": "notification receivers and their delivery log (admin)",
}


class Link(BaseModel):
    href: str
    description: str


class ApiIndex(BaseModel):
    name: str
    version: str
    api: str
    docs: str
    openapi: str
    resources: dict[str, Link]


@router.get(PREFIX, response_model=ApiIndex)
def index() -> ApiIndex:
    """The API's version and a link to each of its resources."""
    return ApiIndex(
        name="slmfleet controller",
        version=__version__,
        api="v1",
        docs="/docs",
        openapi="/openapi.json",
        resources={name: Link(href=f"{PREFIX}/{name}", description=text) for name, text in RESOURCES.items()},
    )

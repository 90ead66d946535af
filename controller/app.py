"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from agent import __version__
from controller import web
from controller.api import docs, openapi
from controller.api.ratelimit import ApiLimits, RateLimitMiddleware
from controller.api.routes import (
    cluster,
    deployments,
    devices,
    enrollment,
    health,
    index,
    jobs,
    models,
    pki,
    rollouts,
    tokens,
    users,
    webhooks,
)
from controller.runtime import ControllerRuntime
from controller.settings import ControllerSettings


def create_app(settings: ControllerSettings, runtime: ControllerRuntime | None = None) -> FastAPI:
    """Build an app for ``settings``; the runtime starts with the app and stops with it."""
    rt = runtime or ControllerRuntime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not rt.started:
            rt.start()
        try:
            yield
        finally:
            rt.stop()

    app = FastAPI(
        title="slmfleet controller",
        version=__version__,
        description="Orchestration for fleets of edge devices running small language models.",
        lifespan=lifespan,
        # Swagger UI from local assets (controller.api.docs); ReDoc would need a CDN
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = rt
    app.state.settings = settings
    app.state.api_limits = limits = ApiLimits(settings, rt.metrics.api_throttled)
    app.add_middleware(RateLimitMiddleware, limits=limits)
    modules = (
        index,
        health,
        cluster,
        devices,
        models,
        jobs,
        deployments,
        rollouts,
        users,
        tokens,
        enrollment,
        pki,
        webhooks,
    )
    routers = [m.router for m in modules]
    for router in routers:
        app.include_router(router)
    docs.install(app)
    web.install(app)
    openapi.install(app, routers)
    return app

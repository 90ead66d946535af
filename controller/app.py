"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from agent import __version__
from controller import web
from controller.api.routes import deployments, devices, enrollment, health, models, pki, rollouts, tokens, users
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
    )
    app.state.runtime = rt
    app.state.settings = settings
    app.include_router(health.router)
    app.include_router(devices.router)
    app.include_router(models.router)
    app.include_router(deployments.router)
    app.include_router(rollouts.router)
    app.include_router(users.router)
    app.include_router(tokens.router)
    app.include_router(enrollment.router)
    app.include_router(pki.router)
    web.install(app)
    return app

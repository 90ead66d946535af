"""The operator dashboard: server-rendered pages, vendored assets, logins with roles, CSRF-checked forms.

``install(app)`` adds it to an app built by ``create_app``; nothing is built at import time.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from controller.web.deps import LoginRequired, WebForbidden, forbidden_handler, login_required_handler
from controller.web.render import STATIC, make_environment
from controller.web.routes import auth, deployments, enrollment, fleet, health, jobs, models, rollouts, webhooks
from controller.web.sessions import LoginBackoff


def install(app: FastAPI) -> None:
    """Mount the dashboard's pages at ``/`` and its static files at ``/static``."""
    app.state.web_templates = make_environment()
    app.state.login_backoff = LoginBackoff()
    app.add_exception_handler(LoginRequired, login_required_handler)
    app.add_exception_handler(WebForbidden, forbidden_handler)
    for module in (auth, fleet, models, jobs, deployments, rollouts, health, enrollment, webhooks):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC, follow_symlink=False), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        """Browsers ask for it on pages without an icon link (plain-text errors)."""
        return FileResponse(
            STATIC / "favicon.svg", media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"}
        )

"""``/docs``: Swagger UI served from this controller, never from a CDN (it must work on an offline network).

The assets are swagger-ui's own dist files as packaged by ``fastapi-swagger`` (a PyPI distribution that
tracks swagger-ui's releases); FastAPI's page template is reused with local URLs.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"


def install(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` with its assets at ``/docs-assets`` (create the app with docs_url=None)."""
    app.mount(ASSETS, StaticFiles(packages=[("fastapi_swagger", "resources")]), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )

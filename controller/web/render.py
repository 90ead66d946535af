"""Templates: the Jinja2 environment, its filters, and a page helper that adds security headers."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, Undefined, select_autoescape

from agent import __version__

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

#: no inline script or style anywhere: every script and stylesheet is a vendored or own file
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _given(value: Any) -> Any:
    """Missing keys of stored JSON (a metric not measured) read as None."""
    return None if isinstance(value, Undefined) else value


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def fmt_time(value: datetime | float | None) -> str:
    """``2026-11-30 12:03:04 UTC``."""
    value = _given(value)
    if value is None:
        return "-"
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    return _aware(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_ago(value: datetime | float | None, now: datetime | None = None) -> str:
    """``3 min ago``, ``2 h ago``, ``5 d ago``."""
    value = _given(value)
    if value is None:
        return "never"
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    seconds = ((now or datetime.now(UTC)) - _aware(value)).total_seconds()
    if seconds < 0:
        return "in " + fmt_duration(-seconds)
    if seconds < 10:
        return "just now"
    return fmt_duration(seconds) + " ago"


def fmt_duration(seconds: float | None) -> str:
    seconds = _given(seconds)
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def fmt_bytes(value: float | None) -> str:
    value = _given(value)
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def fmt_num(value: float | None, digits: int = 3) -> str:
    """Significant digits for measurements; thousands separators for counts."""
    value = _given(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) or abs(value) >= 10**digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def fmt_pct(value: float | None, total: float | None = None) -> str:
    value = _given(value)
    if value is None:
        return "-"
    if total is not None:
        value = 100.0 * value / total if total else 0.0
    return f"{value:.0f}%"


def make_environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters.update(time=fmt_time, ago=fmt_ago, duration=fmt_duration, bytes=fmt_bytes, num=fmt_num, pct=fmt_pct)
    env.globals["version"] = __version__
    return env


def page(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    """Render ``template`` with the request, the user and the CSRF token in its context."""
    env: Environment = request.app.state.web_templates
    principal = getattr(request.state, "principal", None)
    html = env.get_template(template).render(
        request=request, me=principal, csrf_token=principal.csrf_token if principal else "", **context
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)

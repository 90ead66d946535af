"""Finding and calling a running controller from the command line."""

from __future__ import annotations

import json
import os
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import typer

from controller.cli import exits
from controller.cli.files import explain

CONNECTION_FILE = "controller.json"
ADMIN_TOKEN_FILE = "admin-token"


def write_connection_file(data_dir: Path, api_url: str, broker_url: str, ca_file: str | None = None) -> Path:
    path = data_dir / CONNECTION_FILE
    body = {"api": api_url, "broker": broker_url}
    if ca_file:
        body["ca_file"] = ca_file
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


DEFAULT_API = "http://127.0.0.1:8080"


class ApiClient:
    """Calls the REST API; errors become a one-line message and exit code 1."""

    def __init__(self, api: str | None, token: str | None, data_dir: Path, ca_file: Path | None = None) -> None:
        self.data_dir = data_dir
        #: where the controller's URL came from, for the message when it cannot be reached
        self.source = "--api" if api else ""
        if not api and os.environ.get("SLMFLEET_API"):
            api, self.source = os.environ["SLMFLEET_API"], "$SLMFLEET_API"
        self.base = (api or self._api_from_file()).rstrip("/")
        self.token = token or os.environ.get("SLMFLEET_TOKEN") or self._token_from_file()
        self.verify = self._verify(ca_file)

    def _connection(self) -> dict[str, Any]:
        path = self.data_dir / CONNECTION_FILE
        try:
            return dict(json.loads(path.read_text())) if path.is_file() else {}
        except (OSError, ValueError, TypeError):
            typer.echo(f"error: {path} is not what 'slmfleet up' writes; remove it or give --api URL", err=True)
            raise typer.Exit(exits.USAGE) from None

    def _api_from_file(self) -> str:
        path = self.data_dir / CONNECTION_FILE
        api = self._connection().get("api")
        if api:
            self.source = str(path.resolve())
            return str(api)
        self.source = f"the default: no --api, no $SLMFLEET_API, no {path.resolve()}"
        return DEFAULT_API

    def unreachable(self, exc: Exception) -> str:
        """What to say when the controller does not answer: where the URL came from and how to change it."""
        return (
            f"cannot reach the controller at {self.base} (from {self.source}): {exc}. Is 'slmfleet up' running?"
            " Run this command in the directory 'slmfleet up' runs in, or point at it with --data-dir DIR"
            " (or $SLMFLEET_DATA_DIR; its controller.json has the URL) or --api URL (or $SLMFLEET_API)"
        )

    def _verify(self, ca_file: Path | None) -> ssl.SSLContext | bool:
        """How HTTPS is verified: always on; against --ca-file, $SLMFLEET_CA_FILE, controller.json, else system CAs."""
        chosen = ca_file or os.environ.get("SLMFLEET_CA_FILE") or self._connection().get("ca_file")
        if not chosen:
            return True
        if not Path(chosen).is_file():
            typer.echo(f"error: CA file {chosen} does not exist", err=True)
            raise typer.Exit(1)
        return ssl.create_default_context(cafile=str(chosen))

    def _token_from_file(self) -> str | None:
        path = self.data_dir / ADMIN_TOKEN_FILE
        return path.read_text().strip() if path.is_file() else None

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = 30,
        **kwargs: Any,
    ) -> Any:
        all_headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        all_headers.update(headers or {})
        for attempt in range(RATE_LIMIT_TRIES):
            try:
                r = httpx.request(
                    method, self.base + path, headers=all_headers, timeout=timeout, verify=self.verify, **kwargs
                )
            except httpx.HTTPError as exc:
                typer.echo(f"error: {self.unreachable(exc)}", err=True)
                raise typer.Exit(exits.ERROR) from None
            # a 429 is answered before the request did anything: asking again later is safe for every method
            if r.status_code != 429 or attempt == RATE_LIMIT_TRIES - 1:
                break
            wait = min(_retry_after(r), RATE_LIMIT_WAIT_MAX_S)
            typer.echo(f"the controller is rate-limiting this client: asking again in {wait:g} s", err=True)
            time.sleep(wait)
        if r.status_code >= 400:
            typer.echo(f"error: {method} {path}: {r.status_code}: {error_detail(r)}", err=True)
            raise typer.Exit(exits.ERROR)
        return r.json() if r.content else None


#: how often a request refused with 429 is sent, and the longest wait between two tries
RATE_LIMIT_TRIES = 4
RATE_LIMIT_WAIT_MAX_S = 30.0


def _retry_after(r: httpx.Response) -> float:
    try:
        return max(1.0, float(r.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def error_detail(response: httpx.Response) -> str:
    """The API's error in one line: its sentence, or FastAPI's 422 lists as ``field.path: message``."""
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text.strip()[:500]
    if isinstance(detail, list):
        return "; ".join(explain(e) for e in detail[:5]) + (f" (and {len(detail) - 5} more)" if len(detail) > 5 else "")
    return str(detail)

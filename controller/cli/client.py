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

CONNECTION_FILE = "controller.json"
ADMIN_TOKEN_FILE = "admin-token"


def write_connection_file(data_dir: Path, api_url: str, broker_url: str, ca_file: str | None = None) -> Path:
    path = data_dir / CONNECTION_FILE
    body = {"api": api_url, "broker": broker_url}
    if ca_file:
        body["ca_file"] = ca_file
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


class ApiClient:
    """Calls the REST API; errors become a one-line message and exit code 1."""

    def __init__(self, api: str | None, token: str | None, data_dir: Path, ca_file: Path | None = None) -> None:
        self.data_dir = data_dir
        self.base = (api or os.environ.get("SLMFLEET_API") or self._api_from_file()).rstrip("/")
        self.token = token or os.environ.get("SLMFLEET_TOKEN") or self._token_from_file()
        self.verify = self._verify(ca_file)

    def _connection(self) -> dict[str, Any]:
        path = self.data_dir / CONNECTION_FILE
        return dict(json.loads(path.read_text())) if path.is_file() else {}

    def _api_from_file(self) -> str:
        return str(self._connection().get("api", "http://127.0.0.1:8080"))

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
                typer.echo(f"error: cannot reach the controller at {self.base}: {exc}", err=True)
                raise typer.Exit(1) from None
            # a 429 is answered before the request did anything: asking again later is safe for every method
            if r.status_code != 429 or attempt == RATE_LIMIT_TRIES - 1:
                break
            wait = min(_retry_after(r), RATE_LIMIT_WAIT_MAX_S)
            typer.echo(f"the controller is rate-limiting this client: asking again in {wait:g} s", err=True)
            time.sleep(wait)
        if r.status_code >= 400:
            typer.echo(f"error: {method} {path}: {r.status_code}: {error_detail(r)}", err=True)
            raise typer.Exit(1)
        return r.json() if r.content else None


#: how often a request refused with 429 is sent, and the longest wait between two tries
RATE_LIMIT_TRIES = 4
RATE_LIMIT_WAIT_MAX_S = 30.0


def _retry_after(r: httpx.Response) -> float:
    try:
        return max(1.0, float(r.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def error_detail(r: httpx.Response) -> str:
    """The API's error in one line: its sentence, or each field error as ``where: what``."""
    try:
        detail = r.json().get("detail", r.text)
    except (ValueError, AttributeError):
        return r.text
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg", "")))
        return "; ".join(parts) or str(detail)
    return str(detail)

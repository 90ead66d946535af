"""Finding and calling a running controller from the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import typer

CONNECTION_FILE = "controller.json"
ADMIN_TOKEN_FILE = "admin-token"


def write_connection_file(data_dir: Path, api_url: str, broker_url: str) -> Path:
    path = data_dir / CONNECTION_FILE
    path.write_text(json.dumps({"api": api_url, "broker": broker_url}, indent=2) + "\n")
    return path


class ApiClient:
    """Calls the REST API; errors become a one-line message and exit code 1."""

    def __init__(self, api: str | None, token: str | None, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.base = (api or os.environ.get("SLMFLEET_API") or self._api_from_file()).rstrip("/")
        self.token = token or os.environ.get("SLMFLEET_TOKEN") or self._token_from_file()

    def _api_from_file(self) -> str:
        path = self.data_dir / CONNECTION_FILE
        if path.is_file():
            return str(json.loads(path.read_text())["api"])
        return "http://127.0.0.1:8080"

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
        try:
            r = httpx.request(method, self.base + path, headers=all_headers, timeout=timeout, **kwargs)
        except httpx.HTTPError as exc:
            typer.echo(f"error: cannot reach the controller at {self.base}: {exc}", err=True)
            raise typer.Exit(1) from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            typer.echo(f"error: {method} {path}: {r.status_code}: {detail}", err=True)
            raise typer.Exit(1)
        return r.json() if r.content else None

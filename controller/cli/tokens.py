"""``slmfleet tokens``: operators' API tokens (needs an admin token)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from controller.auth.tokens import Role
from controller.cli.client import ApiClient
from controller.cli.options import DEFAULT_DATA_DIR, ApiOpt, DataOpt, JsonOpt, TokenOpt
from controller.cli.output import data_console

app = typer.Typer(help="API tokens: create, list, revoke (admin token needed).", no_args_is_help=True)


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="who or what uses the token (the audit log's actor)")],
    role: Annotated[Role, typer.Option(help="viewer: read only; operator: also change things; admin: everything")],
    expires_in_days: Annotated[
        float | None, typer.Option("--expires-in-days", help="stop working after this many days [default: never]")
    ] = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Create a token; its secret is printed once (only a hash is kept)."""
    body: dict[str, object] = {"name": name, "role": role.value}
    if expires_in_days is not None:
        body["expires_in_days"] = expires_in_days
    created = ApiClient(api, token, data_dir).request("POST", "/api/v1/tokens", json=body)
    expires = (created["expires_at"] or "never")[:19]
    typer.echo(f"created token {created['id']} {created['name']} ({created['role']}, expires {expires})", err=True)
    typer.echo("the secret is shown once; store it now:", err=True)
    typer.echo(created["token"])


@app.command("list")
def list_tokens(
    all_: Annotated[bool, typer.Option("--all", help="also revoked and expired tokens")] = False,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Tokens (never their secrets): role, when created, expiring and last used."""
    tokens = [t for t in ApiClient(api, token, data_dir).request("GET", "/api/v1/tokens") if all_ or t["active"]]
    if as_json:
        typer.echo(json.dumps(tokens, indent=2))
        return
    table = Table("id", "name", "role", "prefix", "created", "expires", "last used", "revoked")
    for t in tokens:
        table.add_row(
            str(t["id"]),
            t["name"],
            t["role"],
            t["prefix"] + "…",
            t["created_at"][:19],
            (t["expires_at"] or "never")[:19],
            (t["last_used_at"] or "never")[:19],
            (t["revoked_at"] or "-")[:19],
        )
    data_console(width=160).print(table)


@app.command("revoke")
def revoke(
    token_id: Annotated[int, typer.Argument(help="the token's id (see 'slmfleet tokens list')")],
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Revoke a token; requests with it are refused from now on."""
    ApiClient(api, token, data_dir).request("DELETE", f"/api/v1/tokens/{token_id}")
    typer.echo(f"revoked token {token_id}")

"""``slmfleet enrollment``: tokens that let devices join the fleet (needs an admin token)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from controller.cli.client import ApiClient
from controller.cli.options import DEFAULT_DATA_DIR, ApiOpt, DataOpt, JsonOpt, TokenOpt
from controller.cli.output import data_console

app = typer.Typer(help="Device enrollment tokens: create, list, revoke (admin token needed).", no_args_is_help=True)


@app.command("create")
def create(
    label: Annotated[list[str] | None, typer.Option("--label", help="KEY=VALUE the device gets (repeatable)")] = None,
    device_id: Annotated[
        str | None,
        typer.Option(
            "--device-id",
            help="bind to this device id: re-enrolls it with new credentials; the only way a revoked or forgotten"
            " device comes back",
        ),
    ] = None,
    expires_in_hours: Annotated[
        float | None, typer.Option("--expires-in-hours", help="lifetime [default: the controller's, 24 h]")
    ] = None,
    note: Annotated[str, typer.Option(help="for whom or what the token is")] = "",
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Create a single-use enrollment token; the secret is printed once (only its hash is kept)."""
    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            typer.echo(f"error: --label {item!r}: use KEY=VALUE", err=True)
            raise typer.Exit(2)
        labels[key] = value
    body: dict[str, object] = {"labels": labels, "note": note}
    if device_id is not None:
        body["device_id"] = device_id
    if expires_in_hours is not None:
        body["expires_in_hours"] = expires_in_hours
    created = ApiClient(api, token, data_dir).request("POST", "/api/v1/enrollment-tokens", json=body)
    typer.echo(f"created enrollment token {created['id']} (single use, expires {created['expires_at'][:19]})", err=True)
    command = created.get("enroll_command") or "slmfleet agent enroll --controller URL --token-file TOKEN_FILE"
    typer.echo(f"shown once; save it in TOKEN_FILE on the device and run: {command}", err=True)
    typer.echo(created["token"])


@app.command("list")
def list_tokens(
    all_: Annotated[bool, typer.Option("--all", help="also used, revoked and expired tokens")] = False,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Enrollment tokens (never their secrets)."""
    found = ApiClient(api, token, data_dir).request("GET", "/api/v1/enrollment-tokens")
    tokens = [t for t in found if all_ or t["usable"]]
    if as_json:
        typer.echo(json.dumps(tokens, indent=2))
        return
    table = Table("id", "prefix", "device", "labels", "note", "expires", "used by", "revoked")
    for t in tokens:
        table.add_row(
            str(t["id"]),
            t["prefix"] + "…",
            t["device_id"] or "-",
            ",".join(f"{k}={v}" for k, v in sorted(t["labels"].items())) or "-",
            t["note"] or "-",
            t["expires_at"][:19],
            t["used_by"] or "-",
            (t["revoked_at"] or "-")[:19],
        )
    data_console(width=160).print(table)


@app.command("revoke")
def revoke(
    token_id: Annotated[int, typer.Argument(help="the token's id (see 'slmfleet enrollment list')")],
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Revoke an unused enrollment token."""
    ApiClient(api, token, data_dir).request("DELETE", f"/api/v1/enrollment-tokens/{token_id}")
    typer.echo(f"revoked enrollment token {token_id}")

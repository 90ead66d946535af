"""``slmfleet users``: who may log in to the dashboard (needs an admin token)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from controller.auth.tokens import Role
from controller.cli.client import ApiClient
from controller.cli.options import DEFAULT_DATA_DIR, ApiOpt, DataOpt, JsonOpt, TokenOpt
from controller.cli.output import data_console

app = typer.Typer(help="Dashboard users: add, list, change, remove (admin token needed).", no_args_is_help=True)

PasswordFileOpt = Annotated[
    Path | None,
    typer.Option("--password-file", help="read the password from this file (never from the command line)"),
]


def _password(path: Path | None, generate_if_not_interactive: bool) -> str | None:
    """From the file, else a hidden prompt on a terminal, else None (the controller generates one)."""
    if path is not None:
        text = path.read_text().strip()
        if not text:
            typer.echo(f"error: {path} is empty", err=True)
            raise typer.Exit(2)
        return text
    if sys.stdin.isatty():
        value: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        return value
    if generate_if_not_interactive:
        return None
    typer.echo("error: give --password-file (no terminal to ask on)", err=True)
    raise typer.Exit(2)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="user name (letters, digits, . _ @ -)")],
    role: Annotated[Role, typer.Option(help="viewer: read only; operator: also act on rollouts; admin: everything")],
    password_file: PasswordFileOpt = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Add a user. Without --password-file: asked on a terminal, otherwise generated and shown once."""
    body: dict[str, Any] = {"name": name, "role": role.value}
    password = _password(password_file, generate_if_not_interactive=True)
    if password is not None:
        body["password"] = password
    client = ApiClient(api, token, data_dir)
    user = client.request("POST", "/api/v1/users", json=body)
    typer.echo(f"added {user['name']} ({user['role']})")
    if user.get("generated_password"):
        typer.echo(f"password (shown once): {user['generated_password']}")


@app.command("list")
def list_users(
    as_json: JsonOpt = False, api: ApiOpt = None, token: TokenOpt = None, data_dir: DataOpt = DEFAULT_DATA_DIR
) -> None:
    """The dashboard's users and when they last logged in."""
    users = ApiClient(api, token, data_dir).request("GET", "/api/v1/users")
    if as_json:
        typer.echo(json.dumps(users, indent=2))
        return
    table = Table("name", "role", "created", "by", "last login")
    for u in users:
        table.add_row(
            u["name"], u["role"], u["created_at"][:19], u["created_by"] or "-", (u["last_login_at"] or "never")[:19]
        )
    data_console().print(table)


@app.command("set")
def set_user(
    name: Annotated[str, typer.Argument(help="user name")],
    role: Annotated[Role | None, typer.Option(help="a new role")] = None,
    password: Annotated[bool, typer.Option("--password", help="set a new password (ends the user's sessions)")] = False,
    password_file: PasswordFileOpt = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Change a user's role or password."""
    body: dict[str, Any] = {}
    if role is not None:
        body["role"] = role.value
    if password or password_file is not None:
        body["password"] = _password(password_file, generate_if_not_interactive=False)
    if not body:
        typer.echo("error: nothing to change: give --role and/or --password", err=True)
        raise typer.Exit(2)
    user = ApiClient(api, token, data_dir).request("PATCH", f"/api/v1/users/{name}", json=body)
    typer.echo(f"updated {user['name']} ({user['role']})")


@app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="user name")],
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Remove a user; their dashboard sessions end at once."""
    ApiClient(api, token, data_dir).request("DELETE", f"/api/v1/users/{name}")
    typer.echo(f"removed {name}")

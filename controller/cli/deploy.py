"""``slmfleet deploy`` and ``slmfleet deployments``: send a version to devices and follow it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from controller.cli.client import ApiClient
from controller.cli.output import data_console

app = typer.Typer(help="Inspect and control deployments.", no_args_is_help=True)

ApiOpt = Annotated[str | None, typer.Option("--api", help="controller URL [default: from the data dir]")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="SLMFLEET_TOKEN", help="operator token")]
DataOpt = Annotated[Path, typer.Option("--data-dir", help="controller data directory")]


def _table(dep: dict[str, Any]) -> Table:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(dep["counts"].items()))
    table = Table(title=f"deployment {dep['id'][:12]}: {dep['model']} v{dep['version']} [{dep['status']}] ({counts})")
    for column in ("device", "variant", "state", "progress", "reason"):
        table.add_column(column)
    for t in dep["targets"][:200]:
        table.add_row(t["device_id"], t["variant"] or "-", t["state"], f"{t['percent']:.0f}%", t["reason"][:60])
    if len(dep["targets"]) > 200:
        table.caption = f"... and {len(dep['targets']) - 200} more devices"
    return table


def deploy(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION")],
    device: Annotated[list[str] | None, typer.Option("--device", "-d", help="a device id (repeatable)")] = None,
    selector: Annotated[str | None, typer.Option(help="label selector, e.g. site=berlin,tier!=canary")] = None,
    variant: Annotated[str, typer.Option(help="auto (per device), fp32, int8 or int4")] = "auto",
    timeout: Annotated[float, typer.Option(help="per-device timeout, seconds")] = 3600.0,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="follow it until it ends")] = True,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """Deploy a model version to devices (by id or label selector) and follow their progress."""
    model, _, version = ref.partition("@")
    if not version.isdigit():
        typer.echo("error: give MODEL@VERSION, e.g. intent@3", err=True)
        raise typer.Exit(2)
    client = ApiClient(api, token, data_dir)
    body: dict[str, Any] = {
        "model": model,
        "version": int(version),
        "variant": variant,
        "timeout_s": timeout,
        "target": {"devices": device} if device else {"selector": selector},
    }
    dep = client.request("POST", "/api/v1/deployments", json=body)
    if wait:
        with Live(_table(dep), console=data_console(stderr=True), refresh_per_second=4) as live:
            while dep["status"] == "running":
                time.sleep(0.5)
                dep = client.request("GET", f"/api/v1/deployments/{dep['id']}")
                live.update(_table(dep))
    if as_json:
        typer.echo(json.dumps(dep, indent=2))
    elif not wait:
        data_console().print(_table(dep))
    if dep["status"] in ("failed", "cancelled"):
        raise typer.Exit(1)


@app.command("list")
def list_(
    status: Annotated[str | None, typer.Option(help="running, completed, failed or cancelled")] = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """List recent deployments."""
    params = {"status": status} if status else {}
    deps = ApiClient(api, token, data_dir).request("GET", "/api/v1/deployments", params=params)
    table = Table(title=f"{len(deps)} deployments")
    for column in ("id", "model", "status", "devices", "created", "by"):
        table.add_column(column)
    for d in deps:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(d["counts"].items()))
        table.add_row(
            d["id"][:12], f"{d['model']}@{d['version']}", d["status"], counts, d["created_at"][:19], d["created_by"]
        )
    data_console().print(table)


@app.command()
def show(
    deployment_id: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """One deployment with every device's state."""
    dep = ApiClient(api, token, data_dir).request("GET", f"/api/v1/deployments/{deployment_id}")
    typer.echo(json.dumps(dep, indent=2)) if as_json else data_console().print(_table(dep))


def _action(action: str) -> Any:
    def run(
        deployment_id: str, api: ApiOpt = None, token: TokenOpt = None, data_dir: DataOpt = Path(".slmfleet")
    ) -> None:
        result = ApiClient(api, token, data_dir).request("POST", f"/api/v1/deployments/{deployment_id}/{action}")
        typer.echo(f"{action}: {result['devices']} devices told")

    run.__doc__ = {
        "cancel": "Stop it on devices that have not switched.",
        "rollback": "Send every touched device back to its previous model.",
        "commit": "Confirm the new model (devices may free the previous slot).",
    }[action]
    return run


for _name in ("cancel", "rollback", "commit"):
    app.command(_name)(_action(_name))

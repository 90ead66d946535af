"""``slmfleet devices``: list, show, label, revoke and forget devices through the REST API."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from controller.cli.client import ApiClient
from controller.cli.options import DEFAULT_DATA_DIR, ApiOpt, DataOpt, JsonOpt, TokenOpt
from controller.cli.output import data_console

app = typer.Typer(help="Inspect, label, revoke and forget devices.", no_args_is_help=True)


@app.command("list")
def list_(
    status: Annotated[str | None, typer.Option(help="online or offline")] = None,
    selector: Annotated[str | None, typer.Option(help="label selector, e.g. site=berlin,tier!=canary")] = None,
    limit: int = 100,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """List devices."""
    params: dict[str, str | int] = {"limit": limit}
    if status:
        params["status"] = status
    if selector:
        params["selector"] = selector
    page = ApiClient(api, token, data_dir).request("GET", "/api/v1/devices", params=params)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    table = Table(title=f"{page['total']} devices")
    for column in ("id", "status", "agent", "installed", "labels", "last seen"):
        table.add_column(column)
    for d in page["items"]:
        installed = _installed(d["installed"])
        labels = ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items())) or "-"
        shown = "revoked" if d.get("revoked_at") else d["status"]
        table.add_row(d["id"], shown, d["agent_version"] or "-", installed, labels, d["last_seen"][:19])
    data_console().print(table)


@app.command()
def show(
    device_id: str,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Show one device: status, hardware, installed models, labels."""
    d = ApiClient(api, token, data_dir).request("GET", f"/api/v1/devices/{device_id}")
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    hw = d.get("hardware") or {}
    ram = f", {hw['ram_bytes'] / 2**30:.1f} GiB RAM" if hw.get("ram_bytes") else ""
    rows = [
        ("device", d["id"]),
        ("status", f"{'revoked' if d.get('revoked_at') else d['status']} since {d['status_changed_at'][:19]}"),
        ("agent", d["agent_version"] or "-"),
        ("hardware", f"{hw.get('arch', '-')}, {hw.get('cpu_count', '?')} CPUs{ram}"),
        ("installed", _installed(d["installed"])),
        ("labels", ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items())) or "-"),
        ("last seen", d["last_seen"][:19]),
    ]
    grid = Table.grid(padding=(0, 2))
    for key, value in rows:
        grid.add_row(key, value)
    data_console().print(grid)


@app.command()
def label(
    device_id: str,
    changes: Annotated[list[str], typer.Argument(help="KEY=VALUE to set, KEY- to remove")],
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Set or remove labels of a device."""
    patch: dict[str, str | None] = {}
    for change in changes:
        if change.endswith("-") and "=" not in change:
            patch[change[:-1]] = None
        elif "=" in change:
            key, value = change.split("=", 1)
            patch[key] = value
        else:
            typer.echo(f"error: {change!r}: use KEY=VALUE or KEY-", err=True)
            raise typer.Exit(2)
    device = ApiClient(api, token, data_dir).request("PATCH", f"/api/v1/devices/{device_id}", json={"labels": patch})
    typer.echo(json.dumps(device["labels"], indent=2))


def _installed(models: list[dict[str, Any]]) -> str:
    """The active models, then the kept ones (the previous slot) in parentheses."""
    names = [
        f"{m['model']}@{m['version']}/{m['variant']}" + ("" if m.get("active", True) else " (kept)")
        for m in sorted(models, key=lambda m: not m.get("active", True))
    ]
    return ", ".join(names) or "-"


@app.command()
def revoke(
    device_id: str,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Revoke a device (admin): its broker credentials stop working and the controller ignores it."""
    result = ApiClient(api, token, data_dir).request("POST", f"/api/v1/devices/{device_id}/revoke")
    typer.echo(
        f"revoked {device_id}" + ("" if result["changed"] else " (it already was)") + "; it comes back only with an"
        f" enrollment token bound to it, created from now on (slmfleet enrollment create --device-id {device_id})"
    )


@app.command()
def forget(
    device_id: str,
    revoke_first: Annotated[
        bool, typer.Option("--revoke", help="revoke it first (admin token): a device with broker credentials must be")
    ] = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Forget a device and its history; it stays forgotten until an admin enrolls it again with a bound token."""
    client = ApiClient(api, token, data_dir)
    if revoke_first:
        client.request("POST", f"/api/v1/devices/{device_id}/revoke")
    client.request("DELETE", f"/api/v1/devices/{device_id}")
    typer.echo(
        f"forgot {device_id}: what it still sends is dropped; to take it back, enroll it with a token bound to it"
        f" (slmfleet enrollment create --device-id {device_id})"
    )


@app.command()
def configure(
    device_id: str,
    telemetry_interval: Annotated[
        float | None, typer.Option("--telemetry-interval", help="seconds between telemetry messages")
    ] = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Change a device's agent settings at run time (a command signed for that device alone)."""
    body: dict[str, Any] = {}
    if telemetry_interval is not None:
        body["telemetry_interval_s"] = telemetry_interval
    if not body:
        typer.echo("error: nothing to change: give --telemetry-interval", err=True)
        raise typer.Exit(2)
    sent = ApiClient(api, token, data_dir).request("POST", f"/api/v1/devices/{device_id}/configure", json=body)
    typer.echo(f"sent {sent['command_id']} to {device_id} (valid until {sent['expires_at']})")

"""``slmfleet deploy`` and ``slmfleet deployments``: send a version to devices and follow it."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from controller.cli import exits
from controller.cli.client import ApiClient
from controller.cli.files import usage_error
from controller.cli.follow import counts_text, follow
from controller.cli.options import DEFAULT_DATA_DIR, SHORT_ID, ApiOpt, DataOpt, JsonOpt, TokenOpt
from controller.cli.output import data_console

app = typer.Typer(help="Inspect and control deployments.", no_args_is_help=True)

#: devices listed in a table; the rest are summed up in its caption
SHOWN_DEVICES = 200
#: a reason this long or shorter stays in the table; longer ones are printed in full below it
REASON_IN_TABLE = 40


def _reasons(targets: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Reason -> devices, for the reasons too long for a table cell (they often say how to fix it)."""
    grouped: dict[str, list[str]] = {}
    for t in targets:
        if len(t["reason"]) > REASON_IN_TABLE:
            grouped.setdefault(t["reason"], []).append(t["device_id"])
    return grouped


def render(dep: dict[str, Any]) -> Group:
    """The deployment: a table of its devices, then every long reason in full with the devices it concerns."""
    title = f"deployment {dep['id'][:SHORT_ID]}: {dep['model']} v{dep['version']} [{dep['status']}]"
    table = Table(title=f"{title} ({counts_text(dep['counts'])})")
    for column in ("device", "variant", "state", "progress", "reason"):
        table.add_column(column)
    long_reasons = _reasons(dep["targets"])
    numbers = {reason: i for i, reason in enumerate(long_reasons, 1)}
    for t in dep["targets"][:SHOWN_DEVICES]:
        reason = f"see ({numbers[t['reason']]}) below" if t["reason"] in numbers else t["reason"] or "-"
        table.add_row(t["device_id"], t["variant"] or "-", t["state"], f"{t['percent']:.0f}%", reason)
    if len(dep["targets"]) > SHOWN_DEVICES:
        table.caption = f"... and {len(dep['targets']) - SHOWN_DEVICES} more devices"
    notes = [
        Text(f"({numbers[reason]}) {_devices_text(devices)}: {reason}") for reason, devices in long_reasons.items()
    ]
    return Group(table, *notes)


def _devices_text(devices: list[str]) -> str:
    shown = ", ".join(devices[:5])
    return shown + (f" and {len(devices) - 5} more" if len(devices) > 5 else "")


def _progress_line(dep: dict[str, Any]) -> str:
    moving = [t["percent"] for t in dep["targets"] if t["state"] == "downloading"]
    mean = f" (downloading {sum(moving) / len(moving):.0f}% on average)" if moving else ""
    return f"deployment {dep['id'][:SHORT_ID]} {dep['status']}: {counts_text(dep['counts'])}{mean}"


def _finish(client: ApiClient, dep: dict[str, Any], wait: bool, as_json: bool) -> None:
    if wait:
        dep = follow(
            dep,
            lambda: client.request("GET", f"/api/v1/deployments/{dep['id']}"),
            done=lambda d: d["status"] != "running",
            view=render,
            line=_progress_line,
            key=lambda d: (d["status"], tuple(sorted(d["counts"].items()))),
            interval_s=0.5,
            resume_hint=f"slmfleet deployments show {dep['id'][:SHORT_ID]} --wait",
        )
    if as_json:
        typer.echo(json.dumps(dep, indent=2))
    else:
        data_console().print(render(dep))
    if dep["status"] in ("failed", "cancelled"):
        raise typer.Exit(exits.FAILED)


def deploy(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION")],
    device: Annotated[list[str] | None, typer.Option("--device", "-d", help="a device id (repeatable)")] = None,
    selector: Annotated[str | None, typer.Option(help="label selector, e.g. site=berlin,tier!=canary")] = None,
    variant: Annotated[str, typer.Option(help="auto (per device), fp32, int8 or int4")] = "auto",
    timeout: Annotated[float, typer.Option(help="per-device timeout, seconds")] = 3600.0,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="follow it until it ends (exit 0 completed, 3 failed or cancelled), with progress on stderr",
        ),
    ] = True,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Deploy a model version to devices (by id or label selector) and follow their progress."""
    model, _, version = ref.partition("@")
    if not model or not version.isdigit():
        raise usage_error(f"{ref!r}: give MODEL@VERSION, e.g. intent@3")
    if not device and not selector:
        raise usage_error("say which devices: --device ID (repeatable) or --selector LABELS, e.g. site=berlin")
    client = ApiClient(api, token, data_dir)
    body: dict[str, Any] = {
        "model": model,
        "version": int(version),
        "variant": variant,
        "timeout_s": timeout,
        "target": {"devices": device} if device else {"selector": selector},
    }
    dep = client.request("POST", "/api/v1/deployments", json=body)
    typer.echo(f"created deployment {dep['id']}", err=True)
    _finish(client, dep, wait, as_json)


@app.command("list")
def list_(
    status: Annotated[str | None, typer.Option(help="running, completed, failed or cancelled")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="the most recent this many")] = 50,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Recent deployments (ids shortened: any unique start of an id works in every command)."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    deps = ApiClient(api, token, data_dir).request("GET", "/api/v1/deployments", params=params)
    if as_json:
        typer.echo(json.dumps(deps, indent=2))
        return
    table = Table(title=f"{len(deps)} deployments")
    table.add_column("id", no_wrap=True, min_width=SHORT_ID)
    for column in ("model", "status", "devices", "created", "by"):
        table.add_column(column)
    for d in deps:
        table.add_row(
            d["id"][:SHORT_ID],
            f"{d['model']}@{d['version']}",
            d["status"],
            counts_text(d["counts"]),
            d["created_at"][:19],
            d["created_by"],
        )
    data_console().print(table)


@app.command()
def show(
    deployment_id: Annotated[str, typer.Argument(help="a deployment id, or any unique start of one")],
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="follow it until it ends (exit 0 completed, 3 failed)")
    ] = False,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """One deployment with every device's state."""
    client = ApiClient(api, token, data_dir)
    dep = client.request("GET", f"/api/v1/deployments/{deployment_id}")
    _finish(client, dep, wait, as_json)


def _action(action: str) -> Any:
    def run(
        deployment_id: Annotated[str, typer.Argument(help="a deployment id, or any unique start of one")],
        as_json: JsonOpt = False,
        api: ApiOpt = None,
        token: TokenOpt = None,
        data_dir: DataOpt = DEFAULT_DATA_DIR,
    ) -> None:
        result = ApiClient(api, token, data_dir).request("POST", f"/api/v1/deployments/{deployment_id}/{action}")
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        else:
            typer.echo(f"{action} deployment {result['deployment']}: {result['devices']} devices told")

    run.__doc__ = {
        "cancel": "Stop it on devices that have not switched.",
        "rollback": "Send every touched device back to its previous model.",
        "commit": "Confirm the new model (devices may free the previous slot).",
    }[action]
    return run


for _name in ("cancel", "rollback", "commit"):
    app.command(_name)(_action(_name))

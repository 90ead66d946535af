"""``slmfleet rollout``: create rollouts and follow their waves and gates."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from controller.cli.client import ApiClient
from controller.cli.output import data_console

app = typer.Typer(help="Roll a model version out in waves, gated on inference metrics.", no_args_is_help=True)

ApiOpt = Annotated[str | None, typer.Option("--api", help="controller URL [default: from the data dir]")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="SLMFLEET_TOKEN", help="operator token")]
DataOpt = Annotated[Path, typer.Option("--data-dir", help="controller data directory")]
ACTIVE = ("pending", "waiting_window", "deploying", "shadow_gating", "activating", "baking", "gating")


def render(r: dict[str, Any]) -> Group:
    head = Table.grid()
    # Text, not markup: selectors, names and reasons are data (a "[/x]" in one must print as it is)
    head.add_row(
        Text.assemble(
            (f"rollout {r['id'][:12]}", "bold"),
            f"  {r['model']} v{r['version']} to '{r['selector']}' ({r['devices']} devices)",
        )
    )
    head.add_row(
        Text.assemble(
            "state ",
            (str(r["state"]), "bold"),
            f" since {r['state_since'][:19]}, wave {r['wave_index'] + 1} of {len(r['waves'])}: {r['reason']}",
        )
    )
    waves = Table(title="waves")
    for column in ("#", "name", "devices", "progress", "bake", "thresholds", "status"):
        waves.add_column(column)
    for w in r["waves"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(w["counts"].items())) or "-"
        waves.add_row(
            str(w["index"] + 1),
            w["name"] or w["until"],
            str(w["devices"]),
            counts,
            f"{w['bake_s']:.0f}s",
            f"ok >= {w['success_threshold']:.0f}%, abort at {w['failure_threshold']} failed"
            + (", approval" if w["require_approval"] else ""),
            w["status"],
        )
    gates = Table(title="gates (latest evaluation)")
    for column in ("gate", "value", "threshold", "samples", "status", "detail"):
        gates.add_column(column)
    for g in r["gates"]:
        value = f"{g['value']:.4g}" if g["value"] is not None else "-"
        threshold = f"{g['comparison']} {g['threshold']}" if g["threshold"] is not None else "off"
        gates.add_row(g["name"], value, threshold, f"{g['samples']}/{g['min_samples']}", g["status"], g["detail"][:80])
    log = Table(title="audit log")
    for column in ("at", "transition", "by", "reason"):
        log.add_column(column)
    for t in r["transitions"][-12:]:
        log.add_row(t["at"][11:19], f"{t['from_state'] or '-'} -> {t['to_state']}", t["actor"], t["reason"][:160])
    return Group(head, waves, gates, log)


@app.command()
def create(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION")],
    selector: Annotated[str, typer.Option(help="which devices: a label selector, e.g. site=berlin")],
    plan: Annotated[Path | None, typer.Option(help="JSON file: waves, gates, shadow, windows, start_at, ...")] = None,
    variant: Annotated[str, typer.Option(help="auto (per device), fp32, int8 or int4")] = "auto",
    shadow: Annotated[bool, typer.Option(help="run the candidate in shadow before switching")] = False,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="show progress until it ends")] = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """Create a rollout (default plan: canary of 1 device or 1%, then 10%, 50%, 100%)."""
    model, _, version = ref.partition("@")
    if not version.isdigit():
        typer.echo("error: give MODEL@VERSION, e.g. intent@3", err=True)
        raise typer.Exit(2)
    body: dict[str, Any] = json.loads(plan.read_text()) if plan else {}
    body.update(model=model, version=int(version), selector=selector, variant=variant)
    if shadow and "shadow" not in body:
        body["shadow"] = {}
    client = ApiClient(api, token, data_dir)
    rollout = client.request("POST", "/api/v1/rollouts", json=body)
    _show(client, rollout, follow)


def _show(client: ApiClient, rollout: dict[str, Any], follow: bool) -> None:
    if not follow:
        data_console().print(render(rollout))
        return
    with Live(render(rollout), console=data_console(), refresh_per_second=2) as live:
        while rollout["state"] in ACTIVE:
            time.sleep(1)
            rollout = client.request("GET", f"/api/v1/rollouts/{rollout['id']}")
            live.update(render(rollout))


@app.command()
def show(
    rollout_id: str,
    follow: Annotated[bool, typer.Option("--follow/--no-follow")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """Waves with their progress, each gate's value against its threshold, and the audit log."""
    client = ApiClient(api, token, data_dir)
    rollout = client.request("GET", f"/api/v1/rollouts/{rollout_id}")
    if as_json:
        typer.echo(json.dumps(rollout, indent=2))
    else:
        _show(client, rollout, follow)


@app.command("list")
def list_(api: ApiOpt = None, token: TokenOpt = None, data_dir: DataOpt = Path(".slmfleet")) -> None:
    """Recent rollouts."""
    rollouts = ApiClient(api, token, data_dir).request("GET", "/api/v1/rollouts")
    table = Table(title=f"{len(rollouts)} rollouts")
    for column in ("id", "model", "selector", "state", "wave", "devices", "created"):
        table.add_column(column)
    for r in rollouts:
        table.add_row(
            r["id"][:12],
            f"{r['model']}@{r['version']}",
            r["selector"],
            r["state"],
            str(r["wave_index"]),
            str(r["devices"]),
            r["created_at"][:19],
        )
    data_console().print(table)


def _action(action: str, doc: str) -> Any:
    def run(
        rollout_id: str,
        reason: Annotated[str, typer.Option(help="why (kept in the audit log)")] = "",
        api: ApiOpt = None,
        token: TokenOpt = None,
        data_dir: DataOpt = Path(".slmfleet"),
    ) -> None:
        client = ApiClient(api, token, data_dir)
        rollout = client.request("POST", f"/api/v1/rollouts/{rollout_id}/{action}", json={"reason": reason})
        data_console().print(render(rollout))

    run.__doc__ = doc
    return run


for _name, _doc in (
    ("pause", "Pause: no new wave, no new device."),
    ("resume", "Resume where it was paused."),
    ("abort", "Abort and send every touched device back to its previous model."),
    ("approve", "Approve the next wave."),
    ("advance", "Start the next wave now, skipping the bake and the gates."),
):
    app.command(_name)(_action(_name, _doc))

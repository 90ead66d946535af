"""``slmfleet rollout``: create rollouts and follow their waves and gates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from controller.cli import exits
from controller.cli.client import ApiClient
from controller.cli.files import read_json_object, usage_error, validate
from controller.cli.follow import counts_text, follow
from controller.cli.options import DEFAULT_DATA_DIR, SHORT_ID, ApiOpt, DataOpt, JsonOpt, TokenOpt
from controller.cli.output import data_console
from controller.rollouts.plan import RolloutCreate

app = typer.Typer(help="Roll a model version out in waves, gated on inference metrics.", no_args_is_help=True)

#: where a rollout ends; --follow waits for one of them (through pauses and approvals)
FINAL = ("completed", "aborted")
PLAN_EXAMPLE = '{"waves": [{"until": 1}, {"until": "100%"}], "gates": {"min_samples": 200}}'


def render(r: dict[str, Any]) -> Group:
    head = Table.grid()
    # Text, not markup: selectors, names and reasons are data (a "[/x]" in one must print as it is)
    head.add_row(
        Text.assemble(
            (f"rollout {r['id'][:SHORT_ID]}", "bold"),
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
        if w.get("succeeded"):
            counts += f"; succeeded {w['succeeded']} (gates passed)"
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
    for column in ("gate", "estimate", "interval", "threshold", "samples", "status", "detail"):
        gates.add_column(column)
    for g in r["gates"]:
        value = f"{g['value']:.4g}" if g["value"] is not None else "-"
        threshold = f"{g['comparison']} {g['threshold']}" if g["threshold"] is not None else "off"
        gates.add_row(
            g["name"],
            value,
            gate_interval(g),
            threshold,
            f"{g['samples']}/{g['min_samples']}",
            g["status"],
            g["detail"],
        )
    log = Table(title="audit log")
    for column in ("at", "transition", "by", "reason"):
        log.add_column(column)
    for t in r["transitions"][-12:]:
        log.add_row(t["at"][11:19], f"{t['from_state'] or '-'} -> {t['to_state']}", t["actor"], t["reason"])
    return Group(head, waves, gates, log)


def gate_interval(g: dict[str, Any]) -> str:
    """``[low, high] @ 95%``: the bounds the gate decided on, or ``-`` before it had any."""
    if g.get("low") is None or g.get("high") is None or g.get("confidence") is None:
        return "-"
    return f"[{g['low']:.4g}, {g['high']:.4g}] @ {g['confidence'] * 100:.0f}%"


def _progress_line(r: dict[str, Any]) -> str:
    """One line of progress for logs: state, the current wave's devices per state, the reason."""
    waves = r["waves"]
    wave = waves[min(r["wave_index"], len(waves) - 1)] if waves else None
    where = f", wave {r['wave_index'] + 1} of {len(waves)}" if wave else ""
    name = f" ({wave['name'] or wave['until']})" if wave else ""
    counts = counts_text(wave["counts"]) if wave else "-"
    reason = f"; {r['reason']}" if r["reason"] else ""
    return f"rollout {r['id'][:SHORT_ID]} {r['state']}{where}{name}: {counts}{reason}"


def _finish(client: ApiClient, rollout: dict[str, Any], follow_it: bool, as_json: bool) -> None:
    """Follow (progress on stderr) if asked, print the rollout on stdout, exit with its outcome."""
    if follow_it:
        rollout = follow(
            rollout,
            lambda: client.request("GET", f"/api/v1/rollouts/{rollout['id']}"),
            done=lambda r: r["state"] in FINAL,
            view=render,
            line=_progress_line,
            key=lambda r: (r["state"], r["wave_index"]),
            interval_s=1.0,
            resume_hint=f"slmfleet rollout show {rollout['id'][:SHORT_ID]} --follow",
        )
    if as_json:
        typer.echo(json.dumps(rollout, indent=2))
    else:
        data_console().print(render(rollout))
    if follow_it and rollout["state"] != "completed":
        raise typer.Exit(exits.FAILED)


@app.command()
def create(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION")],
    selector: Annotated[str, typer.Option(help="which devices: a label selector, e.g. site=berlin")],
    plan: Annotated[Path | None, typer.Option(help="JSON file: waves, gates, shadow, windows, start_at, ...")] = None,
    variant: Annotated[str, typer.Option(help="auto (per device), fp32, int8 or int4")] = "auto",
    shadow: Annotated[bool, typer.Option(help="run the candidate in shadow before switching")] = False,
    shadow_parent: Annotated[
        bool,
        typer.Option(
            help="shadow against the lineage parent: refuse unless the version is derived and every targeted device"
            " serves its parent (implies --shadow)"
        ),
    ] = False,
    follow_it: Annotated[
        bool,
        typer.Option(
            "--follow/--no-follow",
            help="wait until it completes (exit 0) or is aborted (exit 3), with progress on stderr",
        ),
    ] = False,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Create a rollout (default plan: canary of 1 device or 1%, then 10%, 50%, 100%)."""
    model, _, version = ref.partition("@")
    if not model or not version.isdigit():
        raise usage_error(f"{ref!r}: give MODEL@VERSION, e.g. intent@3")
    body: dict[str, Any] = read_json_object(plan, "plan", PLAN_EXAMPLE) if plan else {}
    body.update(model=model, version=int(version), selector=selector, variant=variant)
    if (shadow or shadow_parent) and "shadow" not in body:
        body["shadow"] = {}
    if shadow_parent:
        body["shadow"]["against"] = "parent"
    validate(RolloutCreate, body, f"plan {plan}" if plan else "rollout")
    client = ApiClient(api, token, data_dir)
    rollout = client.request("POST", "/api/v1/rollouts", json=body)
    typer.echo(f"created rollout {rollout['id']}", err=True)
    _finish(client, rollout, follow_it, as_json)


@app.command()
def show(
    rollout_id: Annotated[str, typer.Argument(help="a rollout id, or any unique start of one")],
    follow_it: Annotated[
        bool, typer.Option("--follow/--no-follow", help="wait until it completes (exit 0) or is aborted (exit 3)")
    ] = False,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Waves with their progress, each gate's value against its threshold, and the audit log."""
    client = ApiClient(api, token, data_dir)
    _finish(client, client.request("GET", f"/api/v1/rollouts/{rollout_id}"), follow_it, as_json)


@app.command("list")
def list_(
    limit: Annotated[int, typer.Option(min=1, max=200, help="the most recent this many")] = 50,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Recent rollouts (ids shortened: any unique start of an id works in every command)."""
    rollouts = ApiClient(api, token, data_dir).request("GET", "/api/v1/rollouts", params={"limit": limit})
    if as_json:
        typer.echo(json.dumps(rollouts, indent=2))
        return
    table = Table(title=f"{len(rollouts)} rollouts")
    table.add_column("id", no_wrap=True, min_width=SHORT_ID)
    for column in ("model", "selector", "state", "wave", "devices", "created"):
        table.add_column(column)
    for r in rollouts:
        table.add_row(
            r["id"][:SHORT_ID],
            f"{r['model']}@{r['version']}",
            r["selector"],
            r["state"],
            f"{r['wave_index'] + 1} of {len(r['waves'])}",
            str(r["devices"]),
            r["created_at"][:19],
        )
    data_console().print(table)


def _action(action: str, doc: str) -> Any:
    def run(
        rollout_id: Annotated[str, typer.Argument(help="a rollout id, or any unique start of one")],
        reason: Annotated[str, typer.Option(help="why (kept in the audit log)")] = "",
        as_json: JsonOpt = False,
        api: ApiOpt = None,
        token: TokenOpt = None,
        data_dir: DataOpt = DEFAULT_DATA_DIR,
    ) -> None:
        client = ApiClient(api, token, data_dir)
        rollout = client.request("POST", f"/api/v1/rollouts/{rollout_id}/{action}", json={"reason": reason})
        _finish(client, rollout, False, as_json)

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

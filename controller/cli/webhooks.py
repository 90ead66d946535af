"""``slmfleet webhooks``: URLs told about rollouts, failed deployments and offline devices (admin token)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError
from rich.table import Table

from controller.cli.client import ApiClient
from controller.cli.output import data_console
from controller.notify.webhooks import WebhookCreate, WebhookUpdate

app = typer.Typer(
    help="Webhooks: add, list, change, remove, test, and their delivery log (admin token needed).",
    no_args_is_help=True,
)

ApiOpt = Annotated[str | None, typer.Option("--api", help="controller URL [default: from the data dir]")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="SLMFLEET_TOKEN", help="admin token")]
DataOpt = Annotated[Path, typer.Option("--data-dir", help="controller data directory")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
Ref = Annotated[str, typer.Argument(help="the webhook's id or name (see 'slmfleet webhooks list')")]
EventsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--event",
        help="an event or pattern to send (repeatable): rollout.*, deployment.failed, device.offline, ..."
        " ('slmfleet webhooks events' lists them) [default: all]",
    ),
]


def _client(api: str | None, token: str | None, data_dir: Path) -> ApiClient:
    return ApiClient(api, token, data_dir)


def _resolve(client: ApiClient, ref: str) -> int:
    """A webhook id from an id or a name; a one-line error when there is none."""
    if ref.isdigit():
        return int(ref)
    for hook in client.request("GET", "/api/v1/webhooks"):
        if hook["name"] == ref:
            return int(hook["id"])
    typer.echo(f"error: no webhook named {ref!r} ('slmfleet webhooks list' shows them)", err=True)
    raise typer.Exit(1)


def _secret_from(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text().strip()
    except OSError as exc:
        typer.echo(f"error: cannot read the secret file {path}: {exc.strerror}", err=True)
        raise typer.Exit(1) from None


def _checked(model: type[BaseModel], body: dict[str, Any]) -> None:
    """Check a request body with the API's own model first: one line per problem, not the API's 422 list."""
    try:
        model.model_validate(body)
    except ValidationError as exc:
        for e in exc.errors(include_url=False):
            where = ".".join(str(p) for p in e["loc"]) or "request"
            typer.echo(f"error: {where}: {str(e['msg']).removeprefix('Value error, ')}", err=True)
        raise typer.Exit(1) from None


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _get(path: str, as_json: bool, api: str | None, token: str | None, data_dir: Path) -> Any:
    """GET ``path``; with ``as_json`` print it and return None (the caller prints a table otherwise)."""
    found = _client(api, token, data_dir).request("GET", path)
    if as_json:
        _print_json(found)
        return None
    return found


def _t(value: str | None) -> str:
    return (value or "-")[:19].replace("T", " ")


@app.command("events")
def list_events(
    as_json: JsonOpt = False, api: ApiOpt = None, token: TokenOpt = None, data_dir: DataOpt = Path(".slmfleet")
) -> None:
    """The events a webhook can receive."""
    found = _get("/api/v1/webhook-events", as_json, api, token, data_dir)
    if found is None:
        return
    table = Table("event", "when")
    for item in found:
        table.add_row(item["type"], item["description"])
    data_console(width=140).print(table)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="what it is for, unique (e.g. ops-pager)")],
    url: Annotated[str, typer.Argument(help="where the events are POSTed, http(s)://host[:port]/path")],
    event: EventsOpt = None,
    description: Annotated[str, typer.Option(help="a note for other admins")] = "",
    secret_file: Annotated[
        Path | None,
        typer.Option("--secret-file", help="a file holding the signing secret (whsec_...) [default: generated]"),
    ] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="add it without sending anything yet")] = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """Add a webhook; its signing secret is printed once (keep it on the receiver)."""
    body: dict[str, Any] = {"name": name, "url": url, "description": description, "enabled": not disabled}
    if event:
        body["events"] = event
    secret = _secret_from(secret_file)
    if secret is not None:
        body["secret"] = secret
    _checked(WebhookCreate, body)
    created = _client(api, token, data_dir).request("POST", "/api/v1/webhooks", json=body)
    typer.echo(
        f"added webhook {created['id']} {created['name']} -> {created['url']} ({', '.join(created['events'])})",
        err=True,
    )
    if secret is None:
        typer.echo("its signing secret is shown once; keep it on the receiver:", err=True)
        typer.echo(created["secret"])


@app.command("list")
def list_webhooks(
    as_json: JsonOpt = False, api: ApiOpt = None, token: TokenOpt = None, data_dir: DataOpt = Path(".slmfleet")
) -> None:
    """Webhooks with their deliveries (never their secrets)."""
    found = _get("/api/v1/webhooks", as_json, api, token, data_dir)
    if found is None:
        return
    table = Table("id", "name", "url", "events", "enabled", "pending", "failed", "delivered", "last attempt")
    for w in found:
        last = f"{_t(w['last_attempt_at'])} ({w['last_status'] or 'no answer'})" if w["last_attempt_at"] else "-"
        table.add_row(
            str(w["id"]),
            w["name"],
            w["url"],
            ", ".join(w["events"]),
            "yes" if w["enabled"] else "no",
            str(w["pending"]),
            str(w["failed"]),
            str(w["delivered"]),
            last,
        )
    data_console(width=180).print(table)


@app.command("show")
def show(
    ref: Ref,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """One webhook and its latest deliveries."""
    client = _client(api, token, data_dir)
    webhook_id = _resolve(client, ref)
    hook = client.request("GET", f"/api/v1/webhooks/{webhook_id}")
    recent = client.request("GET", f"/api/v1/webhooks/{webhook_id}/deliveries", params={"limit": 10})
    if as_json:
        _print_json({**hook, "deliveries": recent})
        return
    console = data_console(width=160)
    console.print(f"{hook['id']} {hook['name']} -> {hook['url']}")
    console.print(f"events: {', '.join(hook['events'])}; enabled: {'yes' if hook['enabled'] else 'no'}")
    if hook["description"]:
        console.print(hook["description"])
    console.print(f"deliveries: {hook['pending']} pending, {hook['failed']} failed, {hook['delivered']} delivered")
    _deliveries_table(recent)


def _deliveries_table(items: list[dict[str, Any]]) -> None:
    table = Table("id", "webhook", "event", "status", "attempts", "created", "last attempt", "answer", "next try")
    for d in items:
        answer = str(d["last_status"]) if d["last_status"] else (d["last_error"][:60] or "-")
        table.add_row(
            str(d["id"]),
            d["webhook"],
            d["event_type"],
            d["status"],
            str(d["attempts"]),
            _t(d["created_at"]),
            _t(d["last_attempt_at"]),
            answer,
            _t(d["next_attempt_at"]),
        )
    data_console(width=180).print(table)


@app.command("update")
def update(
    ref: Ref,
    url: Annotated[str | None, typer.Option(help="a new URL")] = None,
    event: EventsOpt = None,
    description: Annotated[str | None, typer.Option(help="a new note")] = None,
    enable: Annotated[bool | None, typer.Option("--enable/--disable", help="send events, or stop")] = None,
    rotate_secret: Annotated[
        bool, typer.Option("--rotate-secret", help="generate a new secret (printed once)")
    ] = False,
    secret_file: Annotated[Path | None, typer.Option("--secret-file", help="a file with a new secret")] = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """Change a webhook's URL, events, note, whether it is enabled, or its secret."""
    client = _client(api, token, data_dir)
    webhook_id = _resolve(client, ref)
    body: dict[str, Any] = {"rotate_secret": rotate_secret}
    for key, value in (("url", url), ("events", event), ("description", description), ("enabled", enable)):
        if value is not None:
            body[key] = value
    secret = _secret_from(secret_file)
    if secret is not None:
        body["secret"] = secret
    _checked(WebhookUpdate, body)
    changed = client.request("PATCH", f"/api/v1/webhooks/{webhook_id}", json=body)
    typer.echo(f"updated webhook {changed['id']} {changed['name']}", err=True)
    if rotate_secret:
        typer.echo("its new signing secret is shown once; keep it on the receiver:", err=True)
        typer.echo(changed["secret"])


@app.command("remove")
def remove(ref: Ref, api: ApiOpt = None, token: TokenOpt = None, data_dir: DataOpt = Path(".slmfleet")) -> None:
    """Remove a webhook with its pending deliveries and its log."""
    client = _client(api, token, data_dir)
    webhook_id = _resolve(client, ref)
    client.request("DELETE", f"/api/v1/webhooks/{webhook_id}")
    typer.echo(f"removed webhook {webhook_id}")


@app.command("test")
def test(ref: Ref, api: ApiOpt = None, token: TokenOpt = None, data_dir: DataOpt = Path(".slmfleet")) -> None:
    """Send a ping event to a webhook now ('slmfleet webhooks deliveries' shows how it went)."""
    client = _client(api, token, data_dir)
    webhook_id = _resolve(client, ref)
    queued = client.request("POST", f"/api/v1/webhooks/{webhook_id}/test")
    typer.echo(f"ping queued as delivery {queued['id']} (event {queued['event_id']})")


@app.command("deliveries")
def deliveries(
    ref: Annotated[str | None, typer.Argument(help="a webhook's id or name [default: every webhook]")] = None,
    status: Annotated[str | None, typer.Option(help="pending, delivered or failed")] = None,
    event: Annotated[str | None, typer.Option(help="an event type, e.g. rollout.aborting")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """The delivery log, newest first: status, attempts, the receiver's last answer, the next try."""
    client = _client(api, token, data_dir)
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if ref is None:
        if event:
            params["event"] = event
        items = client.request("GET", "/api/v1/webhook-deliveries", params=params)
    else:
        items = client.request("GET", f"/api/v1/webhooks/{_resolve(client, ref)}/deliveries", params=params)
        if event:
            items = [d for d in items if d["event_type"] == event]
    if as_json:
        _print_json(items)
        return
    _deliveries_table(items)


@app.command("redeliver")
def redeliver(
    delivery_id: Annotated[int, typer.Argument(help="the delivery's id (see 'slmfleet webhooks deliveries')")],
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """Send a failed delivery again now, with a fresh set of attempts."""
    again = _client(api, token, data_dir).request("POST", f"/api/v1/webhook-deliveries/{delivery_id}/retry")
    typer.echo(f"delivery {again['id']} ({again['event_type']} to {again['webhook']}) is queued again")

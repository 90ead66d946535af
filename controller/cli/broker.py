"""``slmfleet broker``: prepare a mosquitto you run yourself for per-device credentials and ACLs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controller.broker import dynsec

app = typer.Typer(help="Prepare your own mosquitto for slmfleet (dynamic security plugin).", no_args_is_help=True)


@app.command("init-dynsec")
def init_dynsec(
    file: Annotated[
        Path, typer.Option(help="the plugin's configuration to write, e.g. /var/lib/mosquitto/dynamic-security.json")
    ],
    password_file: Annotated[
        Path, typer.Option(help="where the controller's broker password goes (mode 0600; created if missing)")
    ],
    force: Annotated[bool, typer.Option(help="replace an existing plugin file (every device must re-enroll)")] = False,
) -> None:
    """Write a dynamic-security file whose only client is the controller (its administrator)."""
    if file.exists() and not force:
        typer.echo(f"error: {file} exists (it holds the enrolled devices); --force replaces it", err=True)
        raise typer.Exit(2)
    password = dynsec.read_or_create_secret(password_file)
    dynsec.write_initial_config(file, password)
    plugin = dynsec.plugin_path()
    typer.echo(
        f"wrote {file} (controller user {dynsec.CONTROLLER_USER}; password in {password_file})\n"
        "mosquitto.conf (see deploy/mosquitto/mosquitto.conf):\n"
        f"  plugin {plugin or '/usr/lib/<arch>/' + dynsec.PLUGIN_NAME}\n"
        f"  plugin_opt_config_file {file.resolve()}\n"
        "  allow_anonymous false\n"
        f"the plugin rewrites the file: make it the broker's (chown mosquitto: {file})\n"
        "controller settings:\n"
        '  broker_auth = "dynsec"\n'
        f'  mqtt_username = "{dynsec.CONTROLLER_USER}"\n'
        f"  mqtt_password = <the content of {password_file}>  (or SLMFLEET_MQTT_PASSWORD)"
    )

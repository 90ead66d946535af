"""The controller's command line: ``slmfleet up`` and API clients for operators."""

from __future__ import annotations

import typer

from controller.cli import deploy, devices, models, rollouts, simulate, tokens, up, users

app = typer.Typer(
    name="slmfleet",
    help="slmfleet: orchestration for fleets of edge devices that run small language models.\n\n"
    "Devices run 'slmfleet agent --help'.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("up")(up.up)
app.add_typer(devices.app, name="devices")
app.add_typer(models.app, name="model")
app.command("deploy")(deploy.deploy)
app.add_typer(deploy.app, name="deployments")
app.add_typer(rollouts.app, name="rollout")
app.add_typer(users.app, name="users")
app.add_typer(tokens.app, name="tokens")
app.command("simulate")(simulate.simulate)

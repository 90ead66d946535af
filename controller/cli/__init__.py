"""The controller's command line: ``slmfleet up`` and API clients for operators.

``slmfleet.cli`` composes it with ``slmfleet agent`` and ``slmfleet simulate`` into the ``slmfleet`` command.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from controller.cli import (
    artifacts,
    broker,
    deploy,
    devices,
    enrollment,
    jobs,
    models,
    rollouts,
    tokens,
    up,
    users,
    webhooks,
)

app = typer.Typer(
    name="slmfleet",
    help="slmfleet: orchestration for fleets of edge devices that run small language models.\n\n"
    "Devices run 'slmfleet agent --help'.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    ca_file: Annotated[
        Path | None,
        typer.Option(
            "--ca-file",
            envvar="SLMFLEET_CA_FILE",
            help="CA bundle that verifies the controller's HTTPS certificate, for every command"
            " [default: controller.json in the data dir, else the system's CAs]",
        ),
    ] = None,
) -> None:
    if ca_file is not None:
        os.environ["SLMFLEET_CA_FILE"] = str(ca_file)


app.command("up")(up.up)
app.add_typer(devices.app, name="devices")
for _command in (jobs.distill, jobs.prune, jobs.finetune, jobs.derive):
    models.app.command()(_command)
app.add_typer(models.app, name="model")
app.add_typer(jobs.app, name="job")
app.command("deploy")(deploy.deploy)
app.add_typer(deploy.app, name="deployments")
app.add_typer(rollouts.app, name="rollout")
app.add_typer(users.app, name="users")
app.add_typer(tokens.app, name="tokens")
app.add_typer(enrollment.app, name="enrollment")
app.add_typer(broker.app, name="broker")
app.add_typer(webhooks.app, name="webhooks")
app.add_typer(artifacts.app, name="artifacts")

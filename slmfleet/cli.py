"""The ``slmfleet`` command, composed from the agent's, the controller's and the simulations' CLIs.

``slmfleet agent ...`` runs the device agent and needs only the ``agent`` extra (argparse, no CLI
framework; ``slmfleet-agent`` is the same without the word ``agent``). Every other subcommand belongs
to the controller's CLI (``controller.cli.app``), plus ``simulate`` from ``simulations.cli``, both
imported only when asked for.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

from agent import __version__
from agent.cli import agent_main

if TYPE_CHECKING:
    import typer


@functools.cache
def operator_app() -> typer.Typer:
    """The controller's commands plus ``simulate`` (composed once per process)."""
    from controller.cli import app
    from simulations.cli import simulate

    app.command("simulate")(simulate)
    return app


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "agent":
        return agent_main(argv[1:])
    if argv and argv[0] in ("--version", "version"):
        print(f"slmfleet {__version__}")  # noqa: T201
        return 0
    try:
        app = operator_app()
    except ImportError as exc:
        print(  # noqa: T201
            f"The controller commands need the controller extra ({exc}).\n"
            "Install it with: pip install 'slmfleet[controller]'  (devices need only 'slmfleet agent').",
            file=sys.stderr,
        )
        return 2
    return _run_typer(app, argv)


def _run_typer(app: typer.Typer, argv: list[str]) -> int:
    import typer.main

    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="slmfleet", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Options every API command shares: where the controller is and who calls it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ApiOpt = Annotated[
    str | None,
    typer.Option(
        "--api",
        envvar="SLMFLEET_API",
        help="controller URL [default: the 'api' of DATA_DIR/controller.json, written by 'slmfleet up']",
    ),
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="SLMFLEET_TOKEN", help="API token [default: DATA_DIR/admin-token]")
]
DataOpt = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="SLMFLEET_DATA_DIR",
        help="the data directory of 'slmfleet up' (controller.json, admin-token) [default: ./.slmfleet]",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON (full ids) instead of a table")]
DEFAULT_DATA_DIR = Path(".slmfleet")
#: ids are shown this long in tables; any unique prefix works wherever an id is taken
SHORT_ID = 12

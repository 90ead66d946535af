"""Where the CLI prints tables of data: a rich console that reads no markup, so a name, selector or reason
holding "[/x]" prints as it is instead of failing or changing the styling."""

from __future__ import annotations

from typing import Any

from rich.console import Console


def data_console(**kwargs: Any) -> Console:
    return Console(markup=False, **kwargs)

"""Where the CLI prints tables of data: a rich console that reads no markup, so a name, selector or reason
holding "[/x]" prints as it is instead of failing or changing the styling."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console

#: the width of tables written to a file or a pipe (rich's 80 columns would cut ids and reasons there)
FILE_WIDTH = 200


def data_console(**kwargs: Any) -> Console:
    if "width" not in kwargs:
        stream = sys.stderr if kwargs.get("stderr") else sys.stdout
        if not stream.isatty():
            kwargs["width"] = FILE_WIDTH
    return Console(markup=False, **kwargs)

"""Following a rollout or deployment until it ends: progress on stderr, the final result on stdout.

On a terminal the progress is a live view (which disappears when it ends); written to a file or a pipe it is
one line whenever the state changes, and at least every ``PROGRESS_EVERY_S`` seconds, so a CI log shows
that something is happening.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import typer
from rich.console import RenderableType
from rich.live import Live

from controller.cli import exits
from controller.cli.output import data_console

#: seconds between progress lines when stderr is not a terminal
PROGRESS_EVERY_S = 5.0

Resource = dict[str, Any]


def follow(
    first: Resource,
    poll: Callable[[], Resource],
    *,
    done: Callable[[Resource], bool],
    view: Callable[[Resource], RenderableType],
    line: Callable[[Resource], str],
    key: Callable[[Resource], object],
    interval_s: float,
    resume_hint: str,
) -> Resource:
    """Poll until ``done``; returns the last state. Ctrl-C stops following (exit 130), not the work."""
    console = data_console(stderr=True)
    current = first
    try:
        if console.is_terminal:
            with Live(view(current), console=console, refresh_per_second=2, transient=True) as live:
                while not done(current):
                    time.sleep(interval_s)
                    current = poll()
                    live.update(view(current))
            return current
        last_key: object = None
        last_at = float("-inf")
        while True:
            now = time.monotonic()
            if key(current) != last_key or now - last_at >= PROGRESS_EVERY_S or done(current):
                typer.echo(f"{time.strftime('%H:%M:%S')} {line(current)}", err=True)
                last_key, last_at = key(current), now
            if done(current):
                return current
            time.sleep(interval_s)
            current = poll()
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; it goes on (see it with: {resume_hint})", err=True)
        raise typer.Exit(exits.INTERRUPTED) from None


def counts_text(counts: dict[str, int]) -> str:
    """``active 3, downloading 2`` from a state -> devices map ('-' when empty)."""
    return ", ".join(f"{state} {n}" for state, n in sorted(counts.items())) or "-"

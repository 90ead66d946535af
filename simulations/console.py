"""The live console view of a run (rich), or plain progress lines when the output is not a terminal."""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console as RichConsole
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

STATE_STYLE = {
    "not started": "dim",
    "downloading": "cyan",
    "verifying": "blue",
    "staged": "blue",
    "shadow": "magenta",
    "activating": "yellow",
    "active": "green",
    "failed": "red",
    "rolling_back": "yellow",
    "rolled_back": "bright_black",
    "cancelled": "bright_black",
    "idle": "dim",
    "offline": "red",
}


def _bar(counts: dict[str, int], total: int, width: int = 40) -> Text:
    text = Text()
    if total <= 0:
        return text
    used = 0
    for state, style in STATE_STYLE.items():
        n = counts.get(state, 0)
        if not n or state == "offline":
            continue
        cells = max(1, round(width * n / total)) if n else 0
        cells = min(cells, width - used)
        text.append("█" * cells, style=style)
        used += cells
    if used < width:
        text.append("·" * (width - used), style="dim")
    return text


class Console:
    """``with Console(live=...)``: a refreshing panel on a terminal; else a line every few seconds."""

    def __init__(self, *, live: bool, title: str) -> None:
        self.rich = RichConsole(stderr=True)
        self.title = title
        self.live_enabled = live and self.rich.is_terminal
        self.quiet_logs = not self.rich.is_terminal and not live
        self._live: Live | None = None
        self._phase = "starting"
        self._started = time.time()
        self._last_line = 0.0
        self._log: list[str] = []

    def __enter__(self) -> Console:
        if self.live_enabled:
            self._live = Live(self._render(None, None), console=self.rich, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def phase(self, name: str) -> None:
        self._phase = name
        self.log(f"[bold]{name}[/bold]")

    def log(self, message: str, quiet: bool = False) -> None:
        stamp = f"{time.time() - self._started:7.1f}s"
        self._log = [*self._log[-7:], f"{stamp}  {message}"]
        if self._live is not None:
            self._live.console.print(f"[dim]{stamp}[/dim]  {message}", highlight=False)
        elif not quiet and not self.quiet_logs:
            self.rich.print(f"{stamp}  {message}", highlight=False)

    def update(self, runner: Any, sample: dict[str, Any]) -> None:
        if self._live is not None:
            self._live.update(self._render(runner, sample))
        elif not self.quiet_logs and time.time() - self._last_line >= 5.0:
            self._last_line = time.time()
            states = ", ".join(f"{k} {v}" for k, v in sorted(sample["states"].items()))
            wave = sample["wave"] + 1 if sample["wave"] is not None else "-"
            rollout = f"rollout {sample['rollout']} wave {wave}, " if sample["rollout"] else ""
            self.rich.print(f"{time.time() - self._started:7.1f}s  {self._phase}: {rollout}{states}", highlight=False)

    def _render(self, runner: Any, sample: dict[str, Any] | None) -> Group:
        head = Text.assemble((self.title, "bold"), "  ", (self._phase, "cyan"), f"  {time.time() - self._started:.0f}s")
        if sample is None:
            return Group(head)
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        table.add_column("")
        table.add_column("devices", justify="right")
        table.add_column("states", no_wrap=True)
        table.add_column("download", justify="right")
        total = sum(v for k, v in sample["states"].items() if k != "offline")
        table.add_row("fleet", str(total), _bar(sample["states"], total), f"{sample['mb_in']:.1f} MB")
        rollout = runner.rollout if runner is not None else None
        for i, counts in enumerate(sample["waves"]):
            size = sum(counts.values())
            name = rollout["waves"][i]["name"] if rollout and rollout["waves"][i]["name"] else f"wave {i + 1}"
            marker = "▶ " if sample["wave"] == i else "  "
            prog = sample["download"][i]
            table.add_row(
                marker + name,
                str(size),
                _bar(counts, size),
                f"{prog:.0%} ({sample['downloading'][i]})" if prog is not None else "",
            )
        parts: list[Any] = [head]
        if sample["rollout"]:
            parts.append(
                Text.assemble(
                    ("rollout ", "bold"), (sample["rollout"], "yellow"), f"  {(rollout or {}).get('reason', '')[:110]}"
                )
            )
        parts.append(table)
        if sample["gates"]:
            gates = Table(box=None, show_header=True, header_style="bold")
            for col in ("gate", "value", "threshold", "samples", "status"):
                gates.add_column(col)
            for g in sample["gates"]:
                value = "-" if g["value"] is None else f"{g['value']:.4g}"
                threshold = "-" if g["threshold"] is None else f"{g['comparison']} {g['threshold']:.4g}"
                style = {"pass": "green", "fail": "red", "waiting": "yellow"}.get(g["status"], "dim")
                gates.add_row(
                    g["name"], value, threshold, f"{g['samples']}/{g['min_samples']}", Text(g["status"], style=style)
                )
            parts.append(gates)
        if runner is not None:
            faults = runner.stats()["faults"]
            if faults:
                parts.append(Text("faults: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())), style="red"))
        legend = Text("  ")
        for state, style in STATE_STYLE.items():
            if state != "offline":
                legend.append("█ ", style=style)
                legend.append(state + "  ", style="dim")
        parts.append(legend)
        return Group(*parts)

    def summary(self, report: dict[str, Any], json_path: Path, html_path: Path) -> None:
        ok = report["ok"]
        rollout = report.get("rollout")
        if rollout:
            what = f"rollout {rollout.get('state')}"
            if report.get("rollout_duration_s") is not None:
                what += f" in {report['rollout_duration_s']}s"
        else:
            what = f"no rollout; {report['scenario']['devices']} devices ran {sum(report['phases_s'].values()):.0f}s"
        self.rich.print(
            Text.assemble(
                ("PASS" if ok else "FAIL", "bold green" if ok else "bold red"),
                f"  {report['scenario']['name']}: {what}",
            )
        )
        for a in report["assertions"]:
            mark = Text("✓", style="green") if a["ok"] else Text("✗", style="red")
            self.rich.print(Text.assemble("  ", mark, f" {a['name']}: expected {a['expected']}, got {a['actual']}"))
        pops = report.get("populations") or {}
        for name in ("real", "virtual"):
            if pops.get(name, {}).get("devices"):
                p = pops[name]
                serving = ", ".join(f"{k}: {v}" for k, v in sorted(p["final_models"].items()))
                self.rich.print(f"  {name}: {p['devices']} devices, serving {serving}", highlight=False)
        for f in pops.get("faults_not_applied") or []:
            self.rich.print(
                f"  not applied to {f['real_agents']} real agents: {f['kind']} ({f['why']})", highlight=False
            )
        self.rich.print(f"  report: {json_path}  {html_path}", highlight=False)

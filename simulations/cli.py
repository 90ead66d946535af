"""``slmfleet simulate SCENARIO``: rehearse a rollout on a virtual fleet (``slmfleet.cli`` adds it to the command)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def simulate(
    scenario: Annotated[str, typer.Argument(help="scenario file (YAML), or the name of one in simulations/scenarios")],
    devices: Annotated[int | None, typer.Option(help="resize the fleet (the profiles' shares stay)")] = None,
    out: Annotated[Path | None, typer.Option(help="report directory [default: ./simulation-results/NAME-TIME]")] = None,
    processes: Annotated[int | None, typer.Option(help="worker processes [default: one per 2,500 devices]")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a scenario key: --set limits.max_run_s=300 (repeatable)")
    ] = None,
    live: Annotated[bool, typer.Option(help="live console view (on a terminal)")] = True,
    keep_data: Annotated[bool, typer.Option(help="keep the temporary broker, controller and device data")] = False,
    log_level: Annotated[str, typer.Option(help="log level of the worker processes")] = "WARNING",
    real: Annotated[
        int | None,
        typer.Option(help="run N devices as real agent processes beside the virtual ones (fleet.real_agents)"),
    ] = None,
    record_profile: Annotated[
        Path | None,
        typer.Option(help="write the real agents' per-variant latency, memory and download rate to this YAML"),
    ] = None,
) -> None:
    """Run N virtual devices (the real agent code over real MQTT) against a controller, with faults.

    Writes report.json and a self-contained report.html; exits 0 when every expectation held, 1 when one
    did not, 2 when the scenario is invalid.
    """
    import yaml

    from simulations.errors import ScenarioError
    from simulations.runner import RunOptions, run_scenario
    from simulations.scenario import bundled, load_scenario

    overrides = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            typer.echo(f"error: --set {item!r}: use KEY=VALUE", err=True)
            raise typer.Exit(2)
        overrides[key] = yaml.safe_load(value)
    if real is not None:
        overrides["fleet.real_agents"] = real
    try:
        path = Path(scenario) if Path(scenario).is_file() else bundled(scenario)
        parsed = load_scenario(path, devices=devices, overrides=overrides)
    except ScenarioError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    import signal

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the runner's teardown: workers, controller, broker stop

    signal.signal(signal.SIGTERM, _terminate)
    result = run_scenario(
        parsed,
        RunOptions(
            out_dir=out,
            live=live,
            processes=processes,
            log_level=log_level,
            keep_data=keep_data,
            record_profile=record_profile,
        ),
    )
    raise typer.Exit(0 if result.ok else 1)

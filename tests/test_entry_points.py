"""The ``slmfleet`` command composes the agent's, the controller's and the simulations' CLIs; ``slmfleet-agent``
(and ``slmfleet agent``) load nothing of the controller."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from slmfleet.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_scripts_point_at_the_composed_command_and_the_agent() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"slmfleet": "slmfleet.cli:main", "slmfleet-agent": "agent.cli:main"}


def test_the_command_has_controller_agent_and_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("up", "deploy", "simulate", "devices", "rollout"):
        assert f" {command} " in out, out
    assert main(["simulate", "--help"]) == 0
    assert "virtual devices" in capsys.readouterr().out
    assert main(["simulate", "--help"]) == 0  # composed once: asking twice works the same
    with pytest.raises(SystemExit) as exit_:  # argparse's --help
        main(["agent", "--help"])
    assert exit_.value.code == 0
    assert "usage: slmfleet agent" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["-m", "agent.cli", "--help"], ["-m", "agent.cli", "agent", "--help"], ["-m", "slmfleet", "agent", "--help"]],
)
def test_the_agent_command_loads_nothing_of_the_controller(argv: list[str]) -> None:
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['x', *{argv[2:]!r}]\n"
        "try:\n"
        f"    runpy.run_module({argv[1]!r}, run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('controller', 'simulations'))\n"
        "print('LOADED', loaded)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "usage: slmfleet agent" in done.stdout
    assert "LOADED []" in done.stdout, done.stdout

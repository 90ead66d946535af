"""The README's first hour, run as written: the blocks marked ``<!-- walkthrough: ... -->`` in README.md.

A fresh copy of the repository's HEAD (``git archive``: only what is committed) is installed by the README's
own ``make run`` (the ``controller`` extra alone: nothing from ``dev`` or ``convert``), then every marked
block runs in order, as a user in a second shell would run it:

- ``background NAME``: each command is started and left running (``make run``, the agents); the test waits
  until the controller answers, or until the agents' devices are online;
- ``shell``: what the README says to type once in the second shell (activating the venv); it is put in
  front of every later command;
- ``run``: each command runs to its end and must exit 0, with no traceback.

Substitutions, so that the test can run beside anything else on the machine: the default ports 8080
(REST API), 1884 (broker), 8089 and 8090 (the agents' inference endpoints) become free ports (``make run``
gets its two through ``SLMFLEET_HTTP_PORT`` and ``SLMFLEET_EMBEDDED_BROKER_PORT``); ``ROLLOUT_ID`` and
``DEPLOYMENT_ID`` become the first ID that ``rollout list`` and ``deployments list`` printed (shortened, as
printed). The README and this test cannot drift apart: the commands are read from the README.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tarfile
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from pathlib import Path

import httpx
import pytest

from controller.broker.embedded import free_port
from tests.helpers import REPO, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

MARKER = re.compile(r"<!-- walkthrough: (\w+)(?: ([^>]*?))? -->\n```sh\n(.*?)```", re.DOTALL)
SHORT_ID = re.compile(r"\b[0-9a-f]{12}\b")


@dataclass
class Step:
    kind: str  # background, shell or run
    name: str
    commands: list[str]


def parse_walkthrough(readme: str) -> list[Step]:
    """The marked blocks in order; a command continued with a trailing backslash is one command."""
    steps = []
    for kind, label, body in MARKER.findall(readme):
        commands: list[str] = []
        pending = ""
        for line in body.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            commands.append((pending + line).strip())
            pending = ""
        if kind == "background" and "make test is not run" in (label or ""):
            commands = [c for c in commands if not c.startswith("make test")]
        steps.append(Step(kind, (label or "").split(" ")[0], commands))
    return steps


def test_the_readme_describes_a_walkthrough() -> None:
    """The markers are there (a README edit that drops them would silently empty the walkthrough)."""
    steps = parse_walkthrough((REPO / "README.md").read_text())
    kinds = [(s.kind, s.name) for s in steps]
    assert kinds[:3] == [("background", "controller"), ("shell", ""), ("background", "agents")], kinds
    commands = [c for s in steps for c in s.commands]
    assert commands[0].startswith("make run ")
    for needed in ("slmfleet model add", "slmfleet deploy", "slmfleet rollout create", "slmfleet simulate"):
        assert any(c.startswith(needed) for c in commands), needed
    assert any("ROLLOUT_ID" in c for c in commands) and any("DEPLOYMENT_ID" in c for c in commands)


@dataclass
class Walk:
    root: Path
    env: dict[str, str]
    ports: dict[str, int]
    prelude: str = ""
    background: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)
    outputs: list[tuple[str, str, str]] = field(default_factory=list)  # command, stdout, stderr

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['8080']}"

    def substitute(self, command: str) -> str:
        for default, port in self.ports.items():
            command = re.sub(rf"(?<=[:\s]){default}\b", str(port), command)
        for placeholder, lister in (("ROLLOUT_ID", "rollout list"), ("DEPLOYMENT_ID", "deployments list")):
            if placeholder in command:
                printed = next(out for cmd, out, _ in reversed(self.outputs) if lister in cmd)
                found = SHORT_ID.search(printed)
                assert found, f"no id in the output of '{lister}':\n{printed}"
                command = command.replace(placeholder, found.group(0))
        return command

    def start(self, command: str, log: Path) -> None:
        out = open(log, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            ["bash", "-c", f"{self.prelude}\nexec {self.substitute(command)}"],
            cwd=self.root,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: make and the controller it runs stop together
        )
        self.background.append((proc, log))

    def run(self, command: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        command = self.substitute(command)
        done = subprocess.run(
            ["bash", "-c", f"set -o pipefail\n{self.prelude}\n{command}"],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        self.outputs.append((command, done.stdout, done.stderr))
        context = f"$ {command}\n--- exit {done.returncode}, stdout:\n{done.stdout}\n--- stderr:\n{done.stderr}"
        assert done.returncode == 0, context + self.logs()
        assert "Traceback" not in done.stdout + done.stderr, context
        return done

    def logs(self) -> str:
        return "".join(f"\n--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}" for _, log in self.background)

    def stop(self) -> None:
        for proc, _ in reversed(self.background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as the user would stop them
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


def fresh_copy(dest: Path) -> Path:
    """The repository as committed at HEAD (what a clone gets), without this worktree's .venv or data."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tf:
        tf.extractall(dest, filter="data")
    return dest


def user_env(ports: dict[str, int]) -> dict[str, str]:
    """The environment of a user's shell: no virtualenv of the test suite on PATH, no SLMFLEET_* of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLMFLEET_", "PYTEST", "VIRTUAL_ENV"))}
    env.pop("PYTHONPATH", None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    env["SLMFLEET_HTTP_PORT"] = str(ports["8080"])
    env["SLMFLEET_EMBEDDED_BROKER_PORT"] = str(ports["1884"])
    env["COLUMNS"] = "160"
    return env


def test_the_first_hour_as_the_readme_says(tmp_path: Path) -> None:
    steps = parse_walkthrough((REPO / "README.md").read_text())
    root = fresh_copy(tmp_path / "slmfleet")
    ports = {default: free_port() for default in ("8080", "1884", "8089", "8090")}
    walk = Walk(root, user_env(ports), ports)
    try:
        for step in steps:
            if step.kind == "shell":
                walk.prelude = "\n".join(step.commands)
            elif step.kind == "background":
                for i, command in enumerate(step.commands):
                    walk.start(command, tmp_path / f"{step.name}-{i}.log")
                _wait_for(walk, step)
            else:
                for command in step.commands:
                    done = walk.run(command)
                    _check(walk, walk.outputs[-1][0], done)  # the command as run (ids and ports substituted)
        _check_logs(walk)
    finally:
        walk.stop()


def _wait_for(walk: Walk, step: Step) -> None:
    def alive() -> None:
        dead = [log.name for proc, log in walk.background if proc.poll() is not None]
        assert not dead, f"exited: {dead}" + walk.logs()

    if step.name == "controller":

        def up() -> bool:
            alive()
            return bool(httpx.get(walk.api + "/api/v1/health", timeout=2).json()["broker"]["connected"])

        # make run installs the controller extra into a fresh .venv first
        wait_until(up, 900, interval=1, what="make run: controller up" + walk.logs())
        installed = subprocess.run(
            [".venv/bin/python", "-m", "pip", "list", "--format=json"], cwd=walk.root, capture_output=True, text=True
        )
        names = {p["name"].lower() for p in json.loads(installed.stdout)}
        # the default install: nothing of the dev or convert extras (they would hide a missing dependency)
        assert not names & {"pytest", "torch", "transformers", "skl2onnx", "scikit-learn"}, names
    elif step.name == "agents":
        devices = [re.search(r"--device-id (\S+)", c).group(1) for c in step.commands]  # type: ignore[union-attr]

        def online() -> bool:
            alive()
            page = httpx.get(walk.api + "/api/v1/devices", timeout=2).json()
            return all(d["status"] == "online" for d in page["items"]) and len(page["items"]) == len(devices)

        wait_until(online, 60, interval=0.5, what=f"devices {devices} online" + walk.logs())


def _check(walk: Walk, command: str, done: subprocess.CompletedProcess[str]) -> None:
    """What each step of the walkthrough must show beyond exit 0."""
    out, err = done.stdout, done.stderr
    if command.startswith("slmfleet model add"):
        assert "fp32" in out and "int8" in out, out  # int8 is built on the default install
        assert "refused" not in out + err, out + err
    elif command.startswith("slmfleet deploy "):
        assert "[completed]" in out and "active" in out, out
        assert re.search(r"\d\d:\d\d:\d\d deployment [0-9a-f]{12} ", err), err  # progress lines on stderr
    elif "/v1/infer" in command:
        assert "score" in json.loads(out)["result"], out
    elif command.startswith("slmfleet rollout create"):
        assert "state completed" in out, out
        assert re.search(r"rollout [0-9a-f]{12} (deploying|baking|gating)", err), err
    elif command.startswith(("slmfleet rollout show", "slmfleet deployments show")):
        shown = command.split()[3]
        assert shown in out, out  # the id as printed by list works, and names the same resource
    elif command.startswith("slmfleet simulate"):
        out_dir = walk.root / command.split("--out ")[1].split()[0]
        report = json.loads((out_dir / "report.json").read_text())
        assert report["ok"] and (out_dir / "report.html").is_file()


def _check_logs(walk: Walk) -> None:
    agents = [log.read_text() for _, log in walk.background if log.name.startswith("agents")]
    for text in agents:
        assert re.search(r"connected to broker mqtt://127\.0\.0\.1:\d+ as pump-\d", text), text
    # both devices serve v2 and came online once: a model switch did not reset "online since"
    devices = httpx.get(walk.api + "/api/v1/devices", timeout=5).json()["items"]
    for d in devices:
        assert any(m["version"] == 2 and m.get("active", True) for m in d["installed"] if m["model"] == "pump"), d
        online_since, first_seen = (datetime.fromisoformat(d[k]) for k in ("status_changed_at", "first_seen"))
        assert abs((online_since - first_seen).total_seconds()) < 2, d

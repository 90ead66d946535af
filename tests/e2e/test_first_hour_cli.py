"""The CLI against a real controller and agents (issue 13): one controller per data directory, every printed
id usable in every command, exit codes and progress of --follow and deploy, reasons never cut."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from controller.broker.embedded import free_port
from tests.e2e.fleet import Fleet
from tests.helpers import REPO, Proc, slmfleet_cmd, wait_until

pytestmark = pytest.mark.slow
PUMP = REPO / "examples" / "pump"


def cli(fleet: Fleet, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``slmfleet ARGS`` as a user runs it, output to pipes (not a terminal)."""
    assert fleet.controller is not None
    return subprocess.run(
        slmfleet_cmd(*args, "--data-dir", str(fleet.controller.data_dir)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_second_controller_on_the_same_data_dir_is_refused_with_the_first_ones_pid(fleet: Fleet) -> None:
    ctl = fleet.start_controller()
    connection = (ctl.data_dir / "controller.json").read_text()
    second = subprocess.run(
        slmfleet_cmd("up", "--data-dir", str(ctl.data_dir), "--broker", fleet.broker_url, "--port", str(free_port())),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 1, second.stderr
    assert f"(pid {ctl.proc.pid})" in second.stderr and "--data-dir" in second.stderr, second.stderr
    assert (ctl.data_dir / "controller.json").read_text() == connection  # untouched
    ctl.proc.kill()  # a crash: the kernel drops the lock with the process
    fleet.start_controller()


def _created_id(stderr: str, kind: str) -> str:
    found = re.search(rf"created {kind} ([0-9a-f]{{32}})", stderr)
    assert found, stderr
    return found.group(1)


def test_printed_ids_work_everywhere_and_exit_codes_tell_the_outcome(fleet: Fleet, tmp_path: Path) -> None:
    ctl = fleet.start_controller()
    key = str(ctl.data_dir / "signing-key.pub.pem")
    for device in ("pump-1", "pump-2"):
        fleet.start_agent(device, "--label", "site=berlin", "--signing-key-file", key)
    fleet.start_agent("bare-1", "--label", "site=paris")  # no signing key: refuses every deployment
    fleet.wait_online(["pump-1", "pump-2", "bare-1"])
    for agent in ("pump-1", "bare-1"):
        log = fleet.agents[agent].log_path
        wait_until(lambda log=log, agent=agent: f" as {agent} (MQTT" in log.read_text(), 10, what="connect logged")

    options = str(PUMP / "options.json")
    added = cli(
        fleet, "model", "add", str(PUMP / "pump-v1.onnx"), "--name", "pump", "--task", "anomaly", "--options", options
    )
    assert added.returncode == 0 and "int8" in added.stdout, added.stderr

    # a deployment that fails: exit 3, and the reason (which says how to fix it) printed whole
    refused = cli(fleet, "deploy", "pump@1", "--selector", "site=paris")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "set signing_key_file" in refused.stdout and "bare-1" in refused.stdout, refused.stdout

    deployed = cli(fleet, "deploy", "pump@1", "--selector", "site=berlin")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "[completed]" in deployed.stdout and "[completed]" not in deployed.stderr  # the result on stdout
    assert re.search(r"^\d\d:\d\d:\d\d deployment [0-9a-f]{12} ", deployed.stderr, re.M), deployed.stderr
    full = _created_id(deployed.stderr, "deployment")

    listed = cli(fleet, "deployments", "list")
    assert full[:12] in listed.stdout, listed.stdout
    assert json.loads(cli(fleet, "deployments", "list", "--json").stdout)[0]["id"] == full
    assert json.loads(cli(fleet, "deployments", "show", full[:12], "--json").stdout)["id"] == full
    assert cli(fleet, "deployments", "show", full[:6]).returncode == 0
    committed = cli(fleet, "deployments", "commit", full[:12])
    assert committed.returncode == 0 and full in committed.stdout, committed.stderr

    # a rollout followed into a file, steered with the printed id, aborted: --follow exits 3
    added = cli(fleet, "model", "add", str(PUMP / "pump-v2.onnx"), "--name", "pump", "--options", options)
    assert added.returncode == 0, added.stderr
    plan = tmp_path / "slow.json"
    plan.write_text(json.dumps({"waves": [{"until": 1, "bake_s": 600}, {"until": "100%"}]}))
    follower = Proc(
        slmfleet_cmd(
            "rollout",
            "create",
            "pump@2",
            "--selector",
            "site=berlin",
            "--plan",
            str(plan),
            "--follow",
            "--data-dir",
            str(ctl.data_dir),
        ),
        tmp_path / "follow.err",
        env={"PYTHONUNBUFFERED": "1"},
    )
    rollout = _created_id(wait_until(lambda: "created rollout" in follower.log() and follower.log(), 30), "rollout")
    wait_until(lambda: "baking" in follower.log(), 60, what="canary baking")
    short = next(m for m in re.findall(r"\b[0-9a-f]{12}\b", cli(fleet, "rollout", "list").stdout) if m == rollout[:12])
    assert json.loads(cli(fleet, "rollout", "show", short, "--json").stdout)["id"] == rollout
    for action in ("pause", "resume"):
        done = cli(fleet, "rollout", action, short, "--reason", "testing")
        assert done.returncode == 0, done.stderr
    assert cli(fleet, "rollout", "abort", rollout[:8]).returncode == 0
    wait_until(lambda: not follower.alive(), 60, what="--follow ends")
    assert follower.popen.returncode == 3, follower.log()
    progress = follower.log()
    assert re.search(rf"^\d\d:\d\d:\d\d rollout {rollout[:12]} baking, wave 1 of 2", progress, re.M), progress
    assert "aborted" in progress
    assert cli(fleet, "rollout", "show", "ffffffffffff").returncode == 1  # unknown: the controller's 404, exit 1


def test_ctrl_c_stops_following_not_the_rollout(fleet: Fleet, tmp_path: Path) -> None:
    ctl = fleet.start_controller()
    fleet.start_agent("pump-3", "--label", "site=rome", "--signing-key-file", str(ctl.data_dir / "signing-key.pub.pem"))
    fleet.wait_online(["pump-3"])
    options = str(PUMP / "options.json")
    assert (
        cli(
            fleet, "model", "add", str(PUMP / "pump-v1.onnx"), "-n", "pump", "--task", "anomaly", "--options", options
        ).returncode
        == 0
    )
    plan = tmp_path / "slow.json"
    plan.write_text(json.dumps({"waves": [{"until": "100%", "bake_s": 600}]}))
    follower = Proc(
        slmfleet_cmd(
            "rollout",
            "create",
            "pump@1",
            "--selector",
            "site=rome",
            "--plan",
            str(plan),
            "--follow",
            "--data-dir",
            str(ctl.data_dir),
        ),
        tmp_path / "follow.err",
    )
    wait_until(lambda: "baking" in follower.log(), 60, what="baking")
    os.kill(follower.pid, signal.SIGINT)
    wait_until(lambda: not follower.alive(), 20, what="follower stopped")
    assert follower.popen.returncode == 130 and "it goes on" in follower.log(), follower.log()
    shown = json.loads(cli(fleet, "rollout", "list", "--json").stdout)[0]
    assert shown["state"] == "baking"

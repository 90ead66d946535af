"""Process-level faults during deployments: real mosquitto (where the fixtures give it), ``slmfleet up`` and
agents as processes.

- The agent dies (exit 137, as after SIGKILL) right after it persisted entering each state of the
  deployment table (agent/deploy/faults.py, ``SLMFLEET_FAULT_CRASH_AT``); after a restart it ends active
  on the new model or on the old one, never without a model, and its HTTP endpoint answers.
- The broker restarts, and the controller is killed and restarted, in the middle of a transfer.
- A store cap smaller than the artifact: failed with a clear reason, the old model still serving.

Corrupted chunks, tampered or foreign or expired manifests, older versions and models that fail to load
are covered in-process in tests/agent/deploy/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from agent.deploy.faults import CRASH_AT_ENV, CRASH_EXIT_CODE, marker_path
from agent.deploy.states import RESUMABLE
from benchmarks.delivery import BIG_MODEL_OPTIONS, big_model
from controller.broker.embedded import EmbeddedBroker, free_port
from tests.conftest import BROKER_ENGINE
from tests.e2e.fleet import ControllerProc, Fleet
from tests.helpers import Proc, slmfleet_cmd, wait_until
from tests.registry.tiny_models import anomaly_model
from wire.messages import DeployState

pytestmark = pytest.mark.slow

WINDOW = {"values": [0.1, -0.2, 0.3, 0.0, 0.5, -0.1, 0.2, 0.05]}
ENDED = ("completed", "failed", "cancelled", "rolled_back")
TERMINAL = ("active", "failed", "rolled_back", "cancelled")

#: every state a deployment persists and a restarted agent resumes; shadow needs a shadow deployment
#: (not asked for here), so the table's resumable states minus that one
CRASH_STATES = [s.value for s in RESUMABLE if s != DeployState.SHADOW]


def test_crash_states_cover_the_table() -> None:
    """If the table gains a resumable state, this test file must learn to crash in it."""
    assert set(CRASH_STATES) == {"downloading", "verifying", "staged", "activating", "active", "rolling_back"}


# --------------------------------------------------------------- helpers --


def register_anomaly(ctl: ControllerProc, tmp: Path, seed: int) -> int:
    path, threshold = anomaly_model(tmp / f"m{seed}.onnx", seed=seed)
    options = {
        "task": "anomaly",
        "variants": ["fp32"],
        "anomaly": {"threshold": threshold, "higher_is_anomalous": False, "output": "scores"},
    }
    return _upload(ctl, path, options)


def register_big(ctl: ControllerProc, tmp: Path, size_bytes: int, seed: int) -> int:
    """A bigger version of the same task (8-feature windows): a random-weights MatMul model."""
    return _upload(ctl, big_model(tmp / f"big{seed}.onnx", size_bytes, seed=seed), BIG_MODEL_OPTIONS)


def _upload(ctl: ControllerProc, path: Path, options: dict[str, Any]) -> int:
    r = httpx.post(
        ctl.api + "/api/v1/models/pump/versions",
        files=[("file", ("m.onnx", path.read_bytes()))],
        data={"options": json.dumps(options)},
        headers=ctl.auth,
        timeout=300,
    )
    assert r.status_code == 201, r.text
    return int(r.json()["number"])


def size_of(ctl: ControllerProc, version: int) -> int:
    body = ctl.get(f"/api/v1/models/pump/versions/{version}").json()
    return int(next(v for v in body["variants"] if v["variant"] == "fp32")["size_bytes"])


def deploy(ctl: ControllerProc, version: int, devices: list[str]) -> str:
    body = {"model": "pump", "version": version, "variant": "fp32", "target": {"devices": devices}}
    r = httpx.post(ctl.api + "/api/v1/deployments", json=body, headers=ctl.auth, timeout=10)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def deployment(ctl: ControllerProc, dep_id: str) -> dict[str, Any]:
    body: dict[str, Any] = ctl.get(f"/api/v1/deployments/{dep_id}").json()
    return body


def target(ctl: ControllerProc, dep_id: str, device: str) -> dict[str, Any]:
    return next(t for t in deployment(ctl, dep_id)["targets"] if t["device_id"] == device)


def _target_in(ctl: ControllerProc, dep_id: str, device: str, states: tuple[str, ...]) -> dict[str, Any] | None:
    t = target(ctl, dep_id, device)
    return t if t["state"] in states else None


def ended(ctl: ControllerProc, dep_id: str, timeout: float = 90) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        d = deployment(ctl, dep_id)
        return d if d["status"] in ENDED else None

    return cast(dict[str, Any], wait_until(check, timeout, what=f"deployment {dep_id} ended"))


def active_version(ctl: ControllerProc, device_id: str) -> int | None:
    device = ctl.get(f"/api/v1/devices/{device_id}").json()
    active = [m for m in device.get("installed", []) if m.get("active") and m.get("model") == "pump"]
    return active[0]["version"] if active else None


def infer(port: int) -> int | None:
    """One request to the agent's local endpoint: the version that answered, None while none is loaded."""
    r = httpx.post(f"http://127.0.0.1:{port}/v1/infer", json=WINDOW, timeout=10)
    body = r.json()
    if r.status_code != 200 or body.get("model") is None:
        return None
    assert "error" not in body.get("result", {}), body
    return int(body["model"]["version"])


@dataclass
class Agent:
    device_id: str
    http_port: int
    proc: Proc | None = None


def start_agent(
    fleet: Fleet, agent: Agent, key: Path, *extra: str, env: dict[str, str] | None = None, log: str = ""
) -> Proc:
    proc = Proc(
        slmfleet_cmd(
            "agent",
            "--broker",
            fleet.broker_url,
            "--device-id",
            agent.device_id,
            "--data-dir",
            str(fleet.root / agent.device_id),
            "--reconnect-max",
            "1",
            "--signing-key-file",
            str(key),
            "--http-port",
            str(agent.http_port),
            *extra,
        ),
        fleet.root / f"{agent.device_id}{log}.log",
        env=env,
    )
    agent.proc = fleet.agents[agent.device_id] = proc
    return proc


def online(ctl: ControllerProc, device: str, timeout: float = 30) -> None:
    wait_until(lambda: ctl.devices().get(device) == "online", timeout, what=f"{device} online")


def no_tracebacks(fleet: Fleet, device: str) -> None:
    for log in fleet.root.glob(f"{device}*.log"):
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, f"{log}:\n{text[-3000:]}"


# ---------------------------------------------- crash in every table state --


@dataclass
class CrashFleet:
    fleet: Fleet
    ctl: ControllerProc
    key: Path
    v1: int
    v2: int


@pytest.fixture(scope="module")
def crash_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashFleet]:
    """One broker and controller for the table-driven crash tests (each test has its own device)."""
    root = tmp_path_factory.mktemp("crash-fleet")
    broker = EmbeddedBroker(root / "broker", engine=BROKER_ENGINE)  # type: ignore[arg-type]
    broker.start()
    # small chunks: a download is a few dozen chunk frames
    fleet = Fleet(root, broker.url)
    try:
        ctl = fleet.start_controller(env={"SLMFLEET_CHUNK_SIZE": "16384"})
        v1 = register_anomaly(ctl, root, 1)
        v2 = register_anomaly(ctl, root, 2)
        key = root / "controller.pem"
        key.write_text(ctl.get("/api/v1/signing-key").json()["public_key_pem"])
        yield CrashFleet(fleet, ctl, key, v1, v2)
    finally:
        fleet.stop()
        broker.stop()


@pytest.mark.parametrize("state", CRASH_STATES)
def test_agent_killed_in_each_state_ends_with_a_model(crash_fleet: CrashFleet, state: str) -> None:
    """Version 1 serving; the agent dies right after persisting ``state`` (during the deployment of
    version 2, or of the rollback to version 1); restarted, the deployment ends (completed, failed with a
    reason, or rolled back), an active model is reported and the local endpoint answers."""
    cf, ctl = crash_fleet, crash_fleet.ctl
    agent = Agent(f"crash-{state.replace('_', '-')}", free_port())
    start_agent(cf.fleet, agent, cf.key)
    online(ctl, agent.device_id)
    first = ended(ctl, deploy(ctl, cf.v1, [agent.device_id]))
    assert first["status"] == "completed", first
    wait_until(lambda: active_version(ctl, agent.device_id) == cf.v1, 20, what="version 1 reported")
    assert infer(agent.http_port) == cf.v1

    crash_env = {CRASH_AT_ENV: state}
    rollback = state == DeployState.ROLLING_BACK.value
    if rollback:  # version 2 first, then a signed rollback to version 1 is what dies in rolling_back
        dep = deploy(ctl, cf.v2, [agent.device_id])
        assert ended(ctl, dep)["status"] == "completed"
        wait_until(lambda: active_version(ctl, agent.device_id) == cf.v2, 20, what="version 2 reported")

    assert agent.proc is not None
    agent.proc.stop()  # an orderly restart, now with the fault armed
    proc = start_agent(cf.fleet, agent, cf.key, env=crash_env, log="-armed")
    online(ctl, agent.device_id)
    wait_until(lambda: infer(agent.http_port) in (cf.v1, cf.v2), 30, what="serving before the fault")

    if rollback:
        r = httpx.post(ctl.api + f"/api/v1/deployments/{dep}/rollback", headers=ctl.auth, timeout=10)
        assert r.status_code == 200, r.text
    else:
        dep = deploy(ctl, cf.v2, [agent.device_id])
    wait_until(lambda: not proc.alive(), 60, what=f"the agent crashing in {state}")
    assert proc.popen.returncode == CRASH_EXIT_CODE, proc.log()[-3000:]
    assert "fault injection" in proc.log()
    assert marker_path(cf.fleet.root / agent.device_id / "deploy", state).exists()
    proc.stop()

    # restarted with the same environment: the marker keeps it from crashing again
    restarted = start_agent(cf.fleet, agent, cf.key, env=crash_env, log="-restarted")
    online(ctl, agent.device_id)
    ended(ctl, dep)
    t = wait_until(lambda: _target_in(ctl, dep, agent.device_id, TERMINAL), 60, what="the target ended")
    assert t is not None
    done = deployment(ctl, dep)
    if rollback:
        assert t["state"] == "rolled_back", done
        expected: tuple[int, ...] = (cf.v1,)
    elif t["state"] == "active":
        assert done["status"] == "completed", done
        expected = (cf.v2,)
    else:
        assert t["state"] == "failed" and t["reason"], done
        expected = (cf.v1,)
    wait_until(lambda: active_version(ctl, agent.device_id) in expected, 30, what=f"active version in {expected}")
    assert wait_until(lambda: infer(agent.http_port), 30, what="an inference") in expected
    assert restarted.alive()
    no_tracebacks(cf.fleet, agent.device_id)
    restarted.stop()


# ------------------------------------------------ infrastructure restarts --


#: big enough that a transfer in 4 KiB chunks lasts well beyond a restart of the broker or controller
BIG_BYTES = 6 * 1024 * 1024
SMALL_CHUNKS = {"SLMFLEET_CHUNK_SIZE": "4096"}


def _mid_transfer(ctl: ControllerProc, dep: str, device: str) -> dict[str, Any]:
    """Wait until ``device`` holds some but not all chunks of the deployment."""

    def check() -> dict[str, Any] | None:
        t = target(ctl, dep, device)
        return t if t["state"] == "downloading" and t["chunks_have"] > 0 else None

    return cast(dict[str, Any], wait_until(check, 60, interval=0.01, what="some chunks held"))


def test_broker_restart_mid_transfer(
    fleet: Fleet, private_broker: EmbeddedBroker, tmp_path: Path, requires_mosquitto: None
) -> None:
    ctl = fleet.start_controller(env=SMALL_CHUNKS)
    v1 = register_anomaly(ctl, tmp_path, 1)
    v2 = register_big(ctl, tmp_path, BIG_BYTES, seed=3)
    key = tmp_path / "controller.pem"
    key.write_text(ctl.get("/api/v1/signing-key").json()["public_key_pem"])
    agent = Agent("edge-broker", free_port())
    start_agent(fleet, agent, key)
    online(ctl, agent.device_id)
    assert ended(ctl, deploy(ctl, v1, [agent.device_id]))["status"] == "completed"

    dep = deploy(ctl, v2, [agent.device_id])
    before = _mid_transfer(ctl, dep, agent.device_id)
    private_broker.restart()
    assert infer(agent.http_port) == v1  # the old model serves while the broker is away
    done = ended(ctl, dep, 120)
    assert done["status"] == "completed", done
    assert before["chunks_have"] < before["chunks_total"]
    wait_until(lambda: active_version(ctl, agent.device_id) == v2, 30, what="version 2 reported")
    assert infer(agent.http_port) == v2
    no_tracebacks(fleet, agent.device_id)


def test_controller_restart_mid_transfer(fleet: Fleet, tmp_path: Path) -> None:
    ctl = fleet.start_controller(env=SMALL_CHUNKS)
    v1 = register_anomaly(ctl, tmp_path, 1)
    v2 = register_big(ctl, tmp_path, BIG_BYTES, seed=4)
    key = tmp_path / "controller.pem"
    key.write_text(ctl.get("/api/v1/signing-key").json()["public_key_pem"])
    agent = Agent("edge-ctl", free_port())
    start_agent(fleet, agent, key)
    online(ctl, agent.device_id)
    assert ended(ctl, deploy(ctl, v1, [agent.device_id]))["status"] == "completed"

    dep = deploy(ctl, v2, [agent.device_id])
    before = _mid_transfer(ctl, dep, agent.device_id)
    ctl.proc.kill()  # SIGKILL: the controller does not get to save anything on the way out
    assert infer(agent.http_port) == v1
    ctl = fleet.start_controller(env=SMALL_CHUNKS)  # same data directory, new port
    done = ended(ctl, dep, 120)
    assert done["status"] == "completed", done
    assert before["chunks_have"] < before["chunks_total"]
    wait_until(lambda: active_version(ctl, agent.device_id) == v2, 30, what="version 2 reported")
    assert infer(agent.http_port) == v2
    no_tracebacks(fleet, agent.device_id)


def _held_chunks(data_dir: Path) -> int:
    """Chunks the agent's checkpoints record as held (durable), over both slots."""
    total = 0
    for held in data_dir.glob("deploy/slots/*/held.bin"):
        total += sum(bin(b).count("1") for b in held.read_bytes()[32:])
    return total


def test_agent_sigkilled_mid_transfer_resumes_from_its_checkpoint_and_verifies(fleet: Fleet, tmp_path: Path) -> None:
    """SIGKILL while chunks arrive (fsync per checkpoint, not per chunk): the restarted agent keeps what its
    last checkpoint recorded, fetches the rest, checks again every chunk it did not receive itself, and serves."""
    ctl = fleet.start_controller(env=SMALL_CHUNKS)
    v1 = register_anomaly(ctl, tmp_path, 1)
    v2 = register_big(ctl, tmp_path, BIG_BYTES, seed=5)
    key = tmp_path / "controller.pem"
    key.write_text(ctl.get("/api/v1/signing-key").json()["public_key_pem"])
    agent = Agent("edge-kill9", free_port())
    start_agent(fleet, agent, key)
    online(ctl, agent.device_id)
    assert ended(ctl, deploy(ctl, v1, [agent.device_id]))["status"] == "completed"

    dep = deploy(ctl, v2, [agent.device_id])
    data_dir = fleet.root / agent.device_id
    wait_until(lambda: _held_chunks(data_dir) > 0, 60, interval=0.01, what="a checkpoint with chunks held")
    assert agent.proc is not None
    agent.proc.kill()  # SIGKILL: nothing on the way out
    held = _held_chunks(data_dir)
    total = target(ctl, dep, agent.device_id)["chunks_total"]
    assert 0 < held < total, (held, total)
    start_agent(fleet, agent, key, log="-restarted")
    done = ended(ctl, dep, 120)
    assert done["status"] == "completed", done
    wait_until(lambda: active_version(ctl, agent.device_id) == v2, 30, what="version 2 reported")
    assert infer(agent.http_port) == v2
    log = (fleet.root / f"{agent.device_id}-restarted.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def test_full_disk_fails_with_a_reason_and_keeps_the_old_model(fleet: Fleet, tmp_path: Path) -> None:
    """A store cap (--store-max-bytes) that holds version 1 but not version 1 and version 2 together."""
    ctl = fleet.start_controller()
    v1 = register_anomaly(ctl, tmp_path, 1)
    v2 = register_big(ctl, tmp_path, 2 * 1024 * 1024, seed=5)
    cap = size_of(ctl, v1) + size_of(ctl, v2) // 2
    key = tmp_path / "controller.pem"
    key.write_text(ctl.get("/api/v1/signing-key").json()["public_key_pem"])
    agent = Agent("edge-full", free_port())
    start_agent(fleet, agent, key, "--store-max-bytes", str(cap))
    online(ctl, agent.device_id)
    assert ended(ctl, deploy(ctl, v1, [agent.device_id]))["status"] == "completed"

    dep = deploy(ctl, v2, [agent.device_id])
    done = ended(ctl, dep)
    t = done["targets"][0]
    assert done["status"] == "failed" and t["state"] == "failed", done
    assert "store_max_bytes" in t["reason"] and str(cap) in t["reason"], t["reason"]
    wait_until(lambda: active_version(ctl, agent.device_id) == v1, 20, what="version 1 still reported")
    assert infer(agent.http_port) == v1
    no_tracebacks(fleet, agent.device_id)

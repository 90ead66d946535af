"""Rollout abort at 200 devices: from the failure signal to the abort decision (goal < 2 s), and to
every touched device back on its previous model.

Setup: a private broker; the controller as a real ``slmfleet up`` process (REST, MQTT, SQLite, its
scheduler), as deployed; 200 devices as protocol peers (benchmarks/tools/rollout_peers.py) in 4 processes,
each device with its own MQTT connection, speaking the real protocol (signed manifests, chunk broadcast
with sha256 checks, deployment events, signed rollback grants) without running a model. All on one
machine, sharing its cores.

Each trial rolls version 2 out in three waves picked by label: a canary of 2 devices (gates off, no bake),
then 98 devices, then the rest. In the second wave 6 devices fail their self-test 1 s after the download
(the others switch meanwhile); the failure threshold is 1 device. Measured, per trial:

* failure signal: when the first failing device publishes its failed deployment event (its timestamp,
  same machine clock): at or before the moment it reaches the broker, so every figure below is an upper
  bound. ``failure_broker_hop_s`` is how long the event took to reach an observer subscribed to every
  device's events (device -> broker -> subscriber), for scale;
* abort decision: the ``-> aborting`` transition in the rollout's audit log (the controller's clock);
* first rollback command: the first Rollback or Cancel for the rollout's devices arriving at the observer
  (the decision persisted and acted on);
* rollback complete: when the last touched device reports itself back on version 1 (rolled back, or
  cancelled before it switched; the observer's clock), and when the controller marks the rollout aborted.

Between trials every device is back on version 1, so each trial starts from the same fleet.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.common import JsonProc, start_broker, wait_for
from controller.broker.embedded import free_port
from wire import codec, topics
from wire.messages import Cancel, DeploymentEvent, Rollback
from wire.topics import DeviceChannel

DEVICES = 200
PROCESSES = 4
CANARY = 2  # bench-000, bench-001
EARLY = 98  # bench-002 .. bench-099: the wave with the failures
FAILING = ["bench-010", "bench-030", "bench-050", "bench-070", "bench-080", "bench-090"]
FAIL_DELAY_S = 1.0
GOAL_S = 2.0
#: states in which a device serves its previous model
BACK = frozenset({"rolled_back", "cancelled", "failed"})


class Observer:
    """Every device's deployment events as the broker delivers them, stamped on arrival."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        #: deployment -> (when the device published its first failed event, when it arrived here)
        self.first_failed: dict[str, tuple[float, float]] = {}
        self.first_undo: dict[str, float] = {}  # deployment -> arrival of its first Rollback or Cancel command
        #: (deployment, device) -> (state, arrival, installed version)
        self.latest: dict[tuple[str, str], tuple[str, float, int | None]] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-observer")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.subscribe(topics.all_devices(DeviceChannel.EVENTS), 1)
        self.client.subscribe(topics.all_devices(DeviceChannel.CMD), 1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        parsed = topics.parse_device(msg.topic)
        if parsed is None:
            return
        try:
            event = codec.decode(parsed.channel, msg.payload)
        except Exception:
            return
        if isinstance(event, Rollback | Cancel):
            with self.lock:
                self.first_undo.setdefault(event.deployment_id, now)
            return
        if not isinstance(event, DeploymentEvent):
            return
        version = event.installed.version if event.installed is not None else None
        with self.lock:
            if event.state.value == "failed":
                self.first_failed.setdefault(event.deployment_id, (event.ts, now))
            self.latest[(event.deployment_id, parsed.device_id)] = (event.state.value, now, version)

    def back(self, touched: list[tuple[str, str]]) -> float | None:
        """When the last of ``touched`` (deployment, device) reported itself back; None while some are not."""
        with self.lock:
            seen = [self.latest.get(key) for key in touched]
        if any(s is None or s[0] not in BACK or (s[0] == "rolled_back" and s[2] != 1) for s in seen):
            return None
        return max(s[1] for s in seen if s is not None)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Controller:
    """``slmfleet up`` as a child process, ended by its PID."""

    def __init__(self, root: Path, broker_url: str) -> None:
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.data = root / "controller"
        self.log = open(root / "controller.log", "ab")  # noqa: SIM115 - closed in stop()
        args = ["up", "--data-dir", str(self.data), "--broker", broker_url, "--port", str(self.port)]
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "slmfleet", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_for(self._healthy, 60, interval=0.2)
        self.auth = {"Authorization": f"Bearer {(self.data / 'admin-token').read_text().strip()}"}
        self.http = httpx.Client(base_url=self.api, headers=self.auth, timeout=60)

    def _healthy(self) -> bool:
        if self.popen.poll() is not None:
            raise RuntimeError(f"slmfleet up ended (exit {self.popen.returncode}); see {self.log.name}")
        try:
            return bool(httpx.get(self.api + "/api/v1/health", timeout=2).json()["broker"]["connected"])
        except (httpx.HTTPError, KeyError, ValueError):
            return False

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self.log.close()


def _model(path: Path, seed: int) -> Path:
    """A small IsolationForest on 8 sensor features as ONNX: the artifact the devices download."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import IsolationForest

    normal = np.random.default_rng(1).normal(0, 1, (500, 8)).astype(np.float32)
    forest = IsolationForest(n_estimators=10, random_state=seed).fit(normal)
    path.write_bytes(to_onnx(forest, normal[:1], target_opset={"": 17, "ai.onnx.ml": 3}).SerializeToString())
    return path


def _register(ctl: Controller, path: Path) -> dict[str, Any]:
    options = {"task": "anomaly", "anomaly": {"threshold": 0.0, "higher_is_anomalous": False, "output": "scores"}}
    r = ctl.http.post(
        "/api/v1/models/bench/versions",
        files=[("file", ("m.onnx", path.read_bytes()))],
        data={"options": json.dumps(options)},
        timeout=300,
    )
    r.raise_for_status()
    return dict(r.json())


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _rollout_body() -> dict[str, Any]:
    gates_off = {
        "error_rate_max": None,
        "p95_latency_ratio_max": None,
        "rss_ratio_max": None,
        "shadow_agreement_min": None,
        "min_samples": 1,
    }
    wave = {"bake_s": 0, "failure_threshold": "1", "device_timeout_s": 120}
    return {
        "model": "bench",
        "version": 2,
        "variant": "fp32",
        "selector": "fleet=bench",
        "gates": gates_off,
        "waves": [
            {"name": "canary", "selector": "ring=canary", **wave},
            {"name": "early", "selector": "ring=early", **wave},
            {"name": "rest", "until": "100%", **wave},
        ],
    }


def _trial(ctl: Controller, observer: Observer) -> dict[str, Any]:
    r = ctl.http.post("/api/v1/rollouts", json=_rollout_body())
    r.raise_for_status()
    rollout_id = r.json()["id"]
    last: dict[str, Any] = {}

    def ended() -> bool:
        last["view"] = ctl.http.get(f"/api/v1/rollouts/{rollout_id}").json()
        return last["view"]["state"] in ("aborted", "completed")

    wait_for(ended, 180, interval=0.1)
    done = last["view"]
    if done["state"] != "aborted":
        raise RuntimeError(f"rollout {rollout_id} ended {done['state']}: {done['reason']}")
    touched: list[tuple[str, str]] = []
    for w in done["waves"]:
        if w["deployment_id"]:
            dep = ctl.http.get(f"/api/v1/deployments/{w['deployment_id']}").json()
            touched += [(w["deployment_id"], t["device_id"]) for t in dep["targets"]]

    def back() -> bool:
        last["back"] = observer.back(touched)
        return last["back"] is not None

    wait_for(back, 120, interval=0.05)
    states: dict[str, int] = {}
    with observer.lock:
        for key in touched:
            state = observer.latest[key][0]
            states[state] = states.get(state, 0) + 1
    t_fail, t_fail_seen = observer.first_failed[done["waves"][1]["deployment_id"]]
    transitions = done["transitions"]
    aborting = next(t for t in transitions if t["to_state"] == "aborting")
    t_aborted = _at(next(t["at"] for t in transitions if t["to_state"] == "aborted"))

    def on_v1() -> int:  # the controller's view of the fleet: active models as the devices reported them
        page = ctl.http.get("/api/v1/devices", params={"limit": 1000, "selector": "fleet=bench"}).json()
        return sum(
            1
            for d in page["items"]
            if any(m.get("active") and m.get("version") == 1 for m in d.get("installed", []) if m["model"] == "bench")
        )

    wait_for(lambda: on_v1() == DEVICES, 60, interval=0.25)
    return {
        "abort_decision_s": _at(aborting["at"]) - t_fail,
        "broker_hop_s": t_fail_seen - t_fail,
        "first_rollback_command_s": min(observer.first_undo[d] for d, _ in touched if d in observer.first_undo)
        - t_fail,
        "rollback_complete_devices_s": last["back"] - t_fail,
        "rollout_aborted_s": t_aborted - t_fail,
        "touched_devices": len(touched),
        "touched_states": states,
        "abort_reason": aborting["reason"][:160],
    }


def run(quick: bool = False) -> dict[str, Any]:
    trials = 1 if quick else 5
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-rollout-") as tmp:
        root = Path(tmp)
        broker = start_broker(root / "broker")
        ctl: Controller | None = None
        observer: Observer | None = None
        peers: list[JsonProc] = []
        try:
            ctl = Controller(root, broker.url)
            v1 = _register(ctl, _model(root / "v1.onnx", 1))
            _register(ctl, _model(root / "v2.onnx", 2))
            fp32 = next(v for v in v1["variants"] if v["variant"] == "fp32")
            serving = {"model": "bench", "version": 1, "variant": "fp32", "artifact": fp32["artifact_id"]}
            key_file = root / "controller.pem"
            key_file.write_text(ctl.http.get("/api/v1/signing-key").json()["public_key_pem"])
            observer = Observer(broker.port)
            per = DEVICES // PROCESSES
            started = time.time()
            for index in range(PROCESSES):
                peers.append(
                    JsonProc(
                        "benchmarks.tools.rollout_peers",
                        broker.port,
                        key_file,
                        json.dumps(serving),
                        index * per,
                        per,
                        "--canary",
                        CANARY,
                        "--early",
                        EARLY,
                        "--fail-delay",
                        FAIL_DELAY_S,
                        "--fail",
                        *FAILING,
                        stdin=True,
                    )
                )
            connected = sum(p.read(120)["connected"] for p in peers)

            def all_online() -> bool:
                assert ctl is not None
                page = ctl.http.get("/api/v1/devices", params={"limit": 1000, "selector": "fleet=bench"}).json()
                return sum(1 for d in page["items"] if d["status"] == "online") >= DEVICES

            wait_for(all_online, 120, interval=0.25)
            fleet_up_s = time.time() - started
            results = [_trial(ctl, observer) for _ in range(trials)]
        finally:
            for p in peers:
                if p.popen.stdin is not None:
                    p.popen.stdin.close()
            for p in peers:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            if observer is not None:
                observer.close()
            if ctl is not None:
                ctl.stop()
            broker.stop()

    def stat(key: str) -> dict[str, float]:
        values = [r[key] for r in results]
        return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}

    decision = stat("abort_decision_s")
    return {
        "devices": DEVICES,
        "peers_connected": connected,
        "peer_processes": PROCESSES,
        "controller": "slmfleet up (its own process), SQLite",
        "broker": broker.engine,
        "plan": f"canary {CANARY}, then {EARLY} with {len(FAILING)} failing after {FAIL_DELAY_S:g} s, then the rest",
        "failure_threshold": 1,
        "trials": trials,
        "fleet_up_s": round(fleet_up_s, 2),
        "failure_to_abort_decision_s": decision,
        "goal_s": GOAL_S,
        "goal_met": decision["max"] < GOAL_S,
        "failure_to_first_rollback_command_s": stat("first_rollback_command_s"),
        "failure_broker_hop_s": stat("broker_hop_s"),
        "failure_to_touched_devices_back_s": stat("rollback_complete_devices_s"),
        "failure_to_rollout_aborted_s": stat("rollout_aborted_s"),
        "touched_devices": results[0]["touched_devices"],
        "touched_states": results[0]["touched_states"],
        "abort_reason": results[0]["abort_reason"],
        "per_trial": [{k: round(v, 3) for k, v in r.items() if isinstance(v, float)} for r in results],
    }

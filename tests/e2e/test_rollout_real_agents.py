"""Rollouts to real agent processes: the controller (``slmfleet up``) rolls a model version out in waves
over a real broker; agents download, verify, self-test, switch while serving, report inference telemetry
the gates judge, and roll back when the rollout aborts.

The failing devices fail the way a real fleet does: they are smaller. Those agents run with a model store
cap (``--store-max-bytes``) that holds the current model but not the current and the larger new one side
by side, so the new version cannot be installed there; the agent refuses it and reports the reason.
(``--model-max-rss-mib`` would be the memory analogue, but the agent applies it only to ``--model``, not
to deployed models: see the report of this change.)
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from controller.broker.embedded import free_port
from controller.rollouts.gates import MIN_INTERVALS
from tests.e2e.fleet import ControllerProc, Fleet
from tests.e2e.test_deploy_real_agents import WINDOW, active_version, deploy, deployment, pin_key, register
from tests.helpers import wait_until

pytestmark = pytest.mark.slow

#: the default thresholds for errors and memory, and the default confidence; a short warm-up, as the agents
#: report every second and the rollouts here are minutes long. Latency: 1.5, as in examples/first-rollout.json:
#: the agents, the controller and the load share 2 cores with whatever else runs on the machine, and their
#: latency follows that machine's load over time (a device of its own does not)
GATES = {"min_samples": 20, "warmup_s": 2, "deadline_s": 120, "p95_latency_ratio_max": 1.5}


class Load:
    """Applications on the devices: a paced round of requests to every agent's /v1/infer, bounded in
    count and time, recording which model version answered on each port."""

    def __init__(self, ports: dict[str, int], per_agent_per_s: float = 10.0, limit_s: float = 240.0) -> None:
        self.ports = ports
        self.period = 1.0 / per_agent_per_s
        self.limit_s = limit_s
        self.versions: dict[str, Counter[int]] = {d: Counter() for d in ports}
        self.last: dict[str, int] = {}
        self.failures: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        with httpx.Client(timeout=5) as client:
            for _ in range(int(self.limit_s / self.period) + 1):
                started = time.monotonic()
                if self._stop.is_set() or started > deadline:
                    return
                for device, port in self.ports.items():
                    try:
                        r = client.post(f"http://127.0.0.1:{port}/v1/infer", json=WINDOW)
                        body = r.json()
                    except (httpx.HTTPError, ValueError) as exc:
                        self.failures[f"{device}: {type(exc).__name__}"] += 1
                        continue
                    if r.status_code == 200 and "error" not in body.get("result", {}):
                        version = body["model"]["version"]
                        self.versions[device][version] += 1
                        self.last[device] = version
                    else:
                        self.failures[f"{device}: {r.status_code}"] += 1
                self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))  # pacing, not waiting

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def forest_model(path: Path, seed: int, trees: int) -> Path:
    """The ``pump`` anomaly model with more trees: same task, inputs and outputs, a larger artifact."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import IsolationForest

    rng = np.random.default_rng(1)
    normal = rng.normal(0, 1, (2000, 8)).astype(np.float32)
    forest = IsolationForest(n_estimators=trees, random_state=seed).fit(normal)
    onx = to_onnx(forest, normal[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    path.write_bytes(onx.SerializeToString())
    return path


def register_file(ctl: ControllerProc, path: Path) -> dict[str, Any]:
    import json

    options = {"task": "anomaly", "anomaly": {"threshold": 0.0, "higher_is_anomalous": False, "output": "scores"}}
    r = httpx.post(
        ctl.api + "/api/v1/models/pump/versions",
        files=[("file", ("m.onnx", path.read_bytes()))],
        data={"options": json.dumps(options)},
        headers=ctl.auth,
        timeout=120,
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def start_fleet(
    fleet: Fleet, key: Path, devices: dict[str, dict[str, str]], extra: dict[str, list[str]] | None = None
) -> dict[str, int]:
    """Agents with a local HTTP endpoint and 1 s telemetry; returns their ports."""
    ports = {}
    for device, labels in devices.items():
        ports[device] = free_port()
        flags = [f"--label={k}={v}" for k, v in labels.items()]
        fleet.start_agent(
            device,
            "--signing-key-file",
            str(key),
            "--http-port",
            str(ports[device]),
            "--telemetry-interval",
            "1",
            "--threads",
            "1",
            *flags,
            *(extra or {}).get(device, []),
        )
    fleet.wait_online(devices, 90)
    return ports


def serve_v1(ctl: ControllerProc, devices: list[str]) -> None:
    dep = deploy(ctl, 1, devices)
    wait_until(lambda: deployment(ctl, dep)["status"] in ("completed", "failed"), 90, what="version 1 deployed")
    done = deployment(ctl, dep)
    assert done["status"] == "completed", done
    wait_until(lambda: all(active_version(ctl, d) == 1 for d in devices), 30, what="version 1 active everywhere")


def v1_rows_after_warmup(ctl: ControllerProc, device: str) -> list[dict[str, Any]]:
    """The device's version-1 telemetry the gates read as its baseline: rows past the warm-up."""
    rows = ctl.get(f"/api/v1/devices/{device}/telemetry", params={"limit": 100}).json()
    return [
        r
        for r in rows
        if r["model_version"] == 1 and (r["data"].get("serving_s") or 0) - r["interval_s"] >= GATES["warmup_s"]
    ]


def v1_inferences(ctl: ControllerProc, device: str) -> int:
    return sum(r["inference_count"] for r in v1_rows_after_warmup(ctl, device))


def start_rollout(ctl: ControllerProc, waves: list[dict[str, Any]]) -> dict[str, Any]:
    body = {"model": "pump", "version": 2, "variant": "fp32", "selector": "fleet=pumps", "waves": waves, "gates": GATES}
    r = httpx.post(ctl.api + "/api/v1/rollouts", json=body, headers=ctl.auth, timeout=30)
    assert r.status_code == 201, r.text
    return dict(r.json())


def rollout_view(ctl: ControllerProc, rollout_id: str) -> dict[str, Any]:
    return dict(ctl.get(f"/api/v1/rollouts/{rollout_id}").json())


def until_ended(ctl: ControllerProc, rollout_id: str, timeout: float) -> dict[str, Any]:
    """The rollout once it ended (or paused for an operator)."""
    ends = ("completed", "aborted", "paused")
    wait_until(lambda: rollout_view(ctl, rollout_id)["state"] in ends, timeout, interval=0.25, what="rollout end")
    return rollout_view(ctl, rollout_id)


def installed_versions(ctl: ControllerProc, device: str) -> set[int]:
    device_view = ctl.get(f"/api/v1/devices/{device}").json()
    return {m["version"] for m in device_view.get("installed", []) if m.get("model") == "pump"}


def wait_for_baseline(ctl: ControllerProc, devices: list[str]) -> None:
    """Devices served version 1 under load for a while: the gates' baseline (p95, memory)."""
    wait_until(
        lambda: all(
            v1_inferences(ctl, d) >= 2 * GATES["min_samples"] and len(v1_rows_after_warmup(ctl, d)) >= 2 * MIN_INTERVALS
            for d in devices
        ),
        60,
        interval=0.5,
        what="baseline telemetry on version 1",
    )


def test_a_good_model_rolls_out_through_every_wave(fleet: Fleet, tmp_path: Path) -> None:
    ctl = fleet.start_controller()
    register(ctl, tmp_path, 1)
    register(ctl, tmp_path, 2)
    key = pin_key(ctl, tmp_path / "controller.pem")
    devices = [f"pump-{i}" for i in range(6)]
    ports = start_fleet(fleet, key, {d: {"fleet": "pumps"} for d in devices})
    serve_v1(ctl, devices)
    load = Load(ports)
    try:
        wait_for_baseline(ctl, devices)
        waves = [
            {"name": "canary", "until": "1", "bake_s": 2, "failure_threshold": "1", "device_timeout_s": 60},
            {"name": "half", "until": "50%", "bake_s": 2, "failure_threshold": "1", "device_timeout_s": 60},
            {"name": "all", "until": "100%", "bake_s": 2, "failure_threshold": "1", "device_timeout_s": 60},
        ]
        r = start_rollout(ctl, waves)
        assert [w["devices"] for w in r["waves"]] == [1, 2, 3]
        done = until_ended(ctl, r["id"], 240)
        assert done["state"] == "completed", "\n".join(
            [f"{t['from_state']} -> {t['to_state']}: {t['reason']}" for t in done["transitions"]]
            + [str(g) for g in done["gates"]]
        )
        # every device serves version 2: the controller's view and the answers of the devices themselves
        wait_until(lambda: all(active_version(ctl, d) == 2 for d in devices), 20, what="version 2 everywhere")
        wait_until(lambda: all(load.last.get(d) == 2 for d in devices), 20, what="requests answered by version 2")
    finally:
        load.stop()
    # no request failed across any of the switches
    assert not load.failures, load.failures
    assert all(load.versions[d][1] > 0 and load.versions[d][2] > 0 for d in devices), load.versions

    transitions = done["transitions"]
    path = [(t["from_state"], t["to_state"]) for t in transitions]
    wave_path = [("deploying", "baking"), ("baking", "gating")]
    assert path == [
        ("", "pending"),
        ("pending", "deploying"),
        *wave_path,
        ("gating", "deploying"),
        *wave_path,
        ("gating", "deploying"),
        *wave_path,
        ("gating", "completed"),
    ], path
    # every wave passed its gates; the audit log says so, wave by wave, with a reason for each transition
    for number in (1, 2, 3):  # reasons number waves from 1
        assert sum(f"gates passed for wave {number}" in t["reason"] for t in transitions) == 1, number
    assert all(t["reason"] and t["actor"] == "system" for t in transitions[1:])
    for w in done["waves"]:
        assert w["deployment_id"] is not None and w["counts"] == {"active": w["devices"]}, w
    gates = {g["name"]: g for g in done["gates"]}  # the last wave's gates, judged on real telemetry
    assert gates["error_rate"]["status"] == "pass" and gates["error_rate"]["value"] == 0.0, gates
    assert gates["error_rate"]["samples"] >= GATES["min_samples"], gates
    assert gates["p95_latency_ratio"]["status"] == "pass", gates
    assert gates["rss_ratio"]["status"] == "pass", gates
    assert "the model's own memory" in gates["rss_ratio"]["detail"], gates  # the agents' per-model measure
    assert [w["succeeded"] for w in done["waves"]] == [1, 2, 3]
    for d in devices:
        assert "Traceback" not in (tmp_path / f"{d}.log").read_text()


def dense_model(path: Path, layers: int, width: int = 768) -> Path:
    """An anomaly scorer of ``layers`` dense layers (one weight matrix, shared): its compute grows with the
    layers, everything else (inputs, outputs, size) stays the same."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w_in = rng.normal(0, 0.3, (8, width)).astype(np.float32)
    w = rng.normal(0, 1.0 / np.sqrt(width), (width, width)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["X", "w_in"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"h{layers}"], ["scores"], keepdims=1, axes=[1]))
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 1])],
        [onnx.numpy_helper.from_array(w_in, "w_in"), onnx.numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_a_model_three_times_slower_fails_the_latency_gate_on_real_agents(fleet: Fleet, tmp_path: Path) -> None:
    ctl = fleet.start_controller()
    register_file(ctl, dense_model(tmp_path / "v1.onnx", layers=8))
    register_file(ctl, dense_model(tmp_path / "v2.onnx", layers=24))  # three times the compute
    key = pin_key(ctl, tmp_path / "controller.pem")
    devices = [f"pump-{i}" for i in range(3)]
    # no micro-batch wait: the latency the agents report is the model's, not the batcher's 5 ms
    extra = dict.fromkeys(devices, ["--max-wait-ms", "0"])
    ports = start_fleet(fleet, key, {d: {"fleet": "pumps"} for d in devices}, extra)
    serve_v1(ctl, devices)
    load = Load(ports)
    try:
        wait_for_baseline(ctl, devices)
        waves = [
            {"name": "canary", "until": "1", "bake_s": 2, "failure_threshold": "1", "device_timeout_s": 60},
            {"name": "all", "until": "100%", "bake_s": 2, "failure_threshold": "1", "device_timeout_s": 60},
        ]
        r = start_rollout(ctl, waves)
        done = until_ended(ctl, r["id"], 240)
    finally:
        load.stop()
    transitions = [(t["from_state"], t["to_state"], t["reason"]) for t in done["transitions"]]
    assert done["state"] == "aborted" and done["wave_index"] == 0, transitions
    by_name = {g["name"]: g for g in done["gates"]}
    # the latency gate stopped it: failed on evidence, or (on a machine loaded by other jobs) still undecided at
    # its deadline; the others did not fail
    latency = by_name["p95_latency_ratio"]
    assert latency["status"] in ("fail", "waiting"), done["gates"]
    assert all(g["status"] != "fail" for n, g in by_name.items() if n != "p95_latency_ratio"), done["gates"]
    if latency["status"] == "fail":
        assert latency["low"] > GATES["p95_latency_ratio_max"], latency  # beyond the threshold, on evidence
    abort = next(t for t in done["transitions"] if t["to_state"] == "aborting")
    assert "p95_latency_ratio" in abort["reason"], abort
    # the canary goes back to version 1; the other devices never left it
    wait_until(lambda: all(active_version(ctl, d) == 1 for d in devices), 60, what="every device on version 1")
    assert [w["succeeded"] for w in done["waves"]] == [0, 0]


def test_a_model_failing_on_30pct_aborts_in_the_canary_and_touched_devices_return(fleet: Fleet, tmp_path: Path) -> None:
    ctl = fleet.start_controller()
    register(ctl, tmp_path, 1)
    v1_size = (tmp_path / "m1.onnx").stat().st_size
    big = forest_model(tmp_path / "big.onnx", seed=3, trees=150)  # three times the trees of version 1
    v2_size = big.stat().st_size
    assert v2_size > 2 * v1_size
    register_file(ctl, big)
    key = pin_key(ctl, tmp_path / "controller.pem")

    devices = [f"pump-{i}" for i in range(10)]
    small = {"pump-3", "pump-6", "pump-9"}  # 30% of the fleet: room for version 1, not for 1 and 2 together
    # the canary includes one of them; one device at a time, in id order: pump-1 and pump-2 switch to
    # version 2 first, then pump-3 fails, so the abort rolls switched devices back (not only cancels)
    canary = {"pump-1", "pump-2", "pump-3"}
    labels = {d: {"fleet": "pumps", **({"tier": "canary"} if d in canary else {})} for d in devices}
    cap = v1_size + v2_size // 2
    extra = {d: ["--store-max-bytes", str(cap)] for d in small}
    ports = start_fleet(fleet, key, labels, extra)
    serve_v1(ctl, devices)
    load = Load(ports, per_agent_per_s=5.0)
    try:
        wait_until(lambda: all(load.last.get(d) == 1 for d in devices), 30, what="every device answers on v1")
        waves = [
            {"name": "canary", "selector": "tier=canary", "max_concurrent": 1, "bake_s": 30, "failure_threshold": "1"},
            {"name": "half", "until": "50%", "bake_s": 2, "failure_threshold": "1"},
            {"name": "all", "until": "100%", "bake_s": 2, "failure_threshold": "1"},
        ]
        r = start_rollout(ctl, waves)
        assert [w["devices"] for w in r["waves"]] == [3, 2, 5]
        done = until_ended(ctl, r["id"], 90)
        transitions = done["transitions"]
        assert done["state"] == "aborted", [(t["from_state"], t["to_state"], t["reason"]) for t in transitions]
        assert done["wave_index"] == 0
        abort = next(t for t in transitions if t["to_state"] == "aborting")
        assert abort["event"] == "wave_failed" and abort["wave"] == 0, abort
        assert "1 of 3 devices failed in wave 1" in abort["reason"], abort
        assert "model store cap" in abort["reason"], abort  # the device's own reason, carried to the audit log
        assert transitions[-1]["to_state"] == "aborted" and "back on their previous model" in transitions[-1]["reason"]

        # every device the rollout touched reports version 1 active again, and answers with it
        wait_until(lambda: all(active_version(ctl, d) == 1 for d in canary), 60, what="the canary back on v1")
        served_before = {d: load.versions[d][1] for d in canary}
        wait_until(
            lambda: all(load.versions[d][1] > served_before[d] and load.last.get(d) == 1 for d in canary),
            30,
            what="the canary answering on version 1",
        )
    finally:
        load.stop()
    dep = deployment(ctl, done["waves"][0]["deployment_id"])
    states = {t["device_id"]: t["state"] for t in dep["targets"]}
    assert states == {"pump-1": "rolled_back", "pump-2": "rolled_back", "pump-3": "failed"}, dep["targets"]
    assert load.versions["pump-1"][2] > 0  # it did serve version 2 before going back
    # the devices outside the canary were never touched: no deployment for their waves, never had version 2
    assert [w["deployment_id"] for w in done["waves"][1:]] == [None, None]
    for d in set(devices) - canary:
        assert active_version(ctl, d) == 1 and installed_versions(ctl, d) == {1}, d
        assert load.versions[d][2] == 0, (d, load.versions[d])
    assert not load.failures, load.failures
    for d in devices:
        assert "Traceback" not in (tmp_path / f"{d}.log").read_text()

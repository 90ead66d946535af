"""Telemetry messages per second stored by the controller, against a bare paho subscriber receiving
the same stream from the same broker in the same run (issue: goal ratio >= 0.5)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import JsonProc, start_broker, wait_for
from controller.runtime import ControllerRuntime
from controller.settings import load_settings

DEVICES = 2000


def _baseline(port: int, n: int) -> dict[str, float]:
    sub = JsonProc("benchmarks.tools.subscribe", port, n)
    sub.read()  # subscribed
    pub = JsonProc("benchmarks.tools.publish", port, n, DEVICES, stdin=True)
    info = pub.read()
    pub.send()
    pub_done = pub.read()
    got = sub.read()
    pub.wait()
    sub.wait()
    seconds = got["last"] - pub_done["start"]
    return {
        "msgs_per_s": n / seconds,
        "seconds": seconds,
        "payload_bytes": info["payload_bytes"],
        "publisher_msgs_per_s": n / (pub_done["acked"] - pub_done["start"]),
    }


def _controller(port: int, n: int, data_dir: Path) -> dict[str, Any]:
    settings = load_settings(data_dir=data_dir, broker_url=f"mqtt://127.0.0.1:{port}", mqtt_client_id="bench-ctl")
    runtime = ControllerRuntime(settings)
    runtime.start()
    try:
        assert runtime.bridge is not None
        wait_for(lambda: runtime.bridge.connected, 30)
        pub = JsonProc("benchmarks.tools.publish", port, n, DEVICES, stdin=True)
        pub.read()  # births sent
        wait_for(lambda: len(runtime.registry) >= DEVICES, 60)
        assert runtime.writer.flush(60)
        base = runtime.metrics.telemetry_ingested._value.get()
        cpu0 = os.times()
        pub.send()
        done_at = wait_for(lambda: runtime.metrics.telemetry_ingested._value.get() - base >= n, 600)
        cpu1 = os.times()
        started = pub.read()["start"]
        pub.wait()
        seconds = done_at - started
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        return {
            "msgs_per_s": n / seconds,
            "seconds": seconds,
            "cpu_s": cpu,
            "cpu_us_per_msg": cpu / n * 1e6,
            "batches": runtime.writer.batches,
            "invalid": runtime.handler.drops.total,
        }
    finally:
        runtime.stop()


def run(quick: bool = False) -> dict[str, Any]:
    n = 20_000 if quick else 100_000
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-ingest-") as tmp:
        broker = start_broker(Path(tmp) / "broker")
        try:
            baseline = _baseline(broker.port, n)
            time.sleep(0.5)  # let the broker drain its logs between phases
            controller = _controller(broker.port, n, Path(tmp) / "controller")
        finally:
            broker.stop()
    return {
        "messages": n,
        "devices": DEVICES,
        "qos": 1,
        "broker": broker.engine,
        "database": "sqlite (WAL)",
        "payload_bytes": baseline["payload_bytes"],
        "baseline_bare_paho_msgs_per_s": round(baseline["msgs_per_s"]),
        "publisher_msgs_per_s": round(baseline["publisher_msgs_per_s"]),
        "controller_stored_msgs_per_s": round(controller["msgs_per_s"]),
        "ratio": round(controller["msgs_per_s"] / baseline["msgs_per_s"], 3),
        "goal_ratio": 0.5,
        "controller_cpu_us_per_msg": round(controller["cpu_us_per_msg"], 1),
        "write_batches": controller["batches"],
        "invalid_payloads": controller["invalid"],
    }

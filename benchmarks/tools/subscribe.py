"""The baseline: a bare paho subscriber. ``python -m benchmarks.tools.subscribe PORT N`` counts N
telemetry messages and prints the time the last one arrived and the CPU it spent on them."""

from __future__ import annotations

import json
import os
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    port, n = int(sys.argv[1]), int(sys.argv[2])
    state = {"count": 0, "last": 0.0, "cpu0": 0.0, "cpu": 0.0}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{time.time_ns()}", protocol=mqtt.MQTTv311)

    def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        state["count"] += 1
        if state["count"] == 1:
            state["cpu0"] = _cpu()
        if state["count"] >= n:
            state["last"] = time.time()
            state["cpu"] = _cpu() - state["cpu0"]
            c.disconnect()

    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe("slmfleet/v1/dev/+/telemetry", 1)
    client.connect("127.0.0.1", port, keepalive=60)
    ready = {"done": False}

    def on_subscribe(*a: object) -> None:
        if not ready["done"]:
            ready["done"] = True
            print(json.dumps({"ready": True}), flush=True)  # noqa: T201

    client.on_subscribe = on_subscribe
    client.loop_forever()
    # CPU per message, over the n - 1 messages after the first
    us_per_msg = state["cpu"] / max(1, n - 1) * 1e6
    print(json.dumps({"last": state["last"], "count": state["count"], "cpu_us_per_msg": us_per_msg}), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()

"""A separate publisher process: ``python -m benchmarks.tools.publish PORT N DEVICES [MODE [PREFIX]]`` sends N valid
telemetry messages (QoS 1) round-robin over DEVICES device topics as fast as the broker takes them,
after one birth per device, then prints a JSON line with its own timings."""

from __future__ import annotations

import json
import sys
import time
from collections import deque

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from wire import codec, topics
from wire.messages import DeviceOnline, HardwareProfile, InferenceStats, LatencySummary, Telemetry


def payloads(n: int, devices: int, prefix: str = "bench") -> list[tuple[str, bytes]]:
    latency = LatencySummary(
        p50_ms=3.1, p95_ms=7.9, p99_ms=12.4, mean_ms=3.6, max_ms=15.0, buckets=[(64, 80), (70, 20)]
    )
    out = []
    now = time.time()
    for k in range(n):
        device = f"{prefix}-{k % devices:05d}"
        msg = Telemetry(
            ts=now + k * 1e-6,
            seq=k // devices,
            interval_s=10.0,
            uptime_s=3600.0,
            cpu_percent=23.5,
            rss_bytes=118_000_000,
            inference=InferenceStats(count=100, errors=0, latency=latency),
        )
        out.append((topics.telemetry(device), codec.encode(msg)))
    return out


def births(devices: int, prefix: str = "bench") -> list[tuple[str, bytes]]:
    hw = HardwareProfile(cpu_count=4, ram_bytes=4 * 2**30, arch="aarch64", os="Linux")
    return [
        (
            topics.state(f"{prefix}-{i:05d}"),
            codec.encode(
                DeviceOnline(
                    ts=time.time(), agent_version="bench", hardware=hw, keepalive_s=60, telemetry_interval_s=10
                )
            ),
        )
        for i in range(devices)
    ]


#: unacknowledged messages at most: message ids are 16 bits, and paho refuses an id still in use
MAX_PENDING = 50_000


def publish_all(client: mqtt.Client, items: list[tuple[str, bytes]]) -> None:
    pending: deque[mqtt.MQTTMessageInfo] = deque()
    for topic, payload in items:
        if len(pending) >= MAX_PENDING:
            pending.popleft().wait_for_publish(120)
        pending.append(client.publish(topic, payload, qos=1))
    for info in pending:
        info.wait_for_publish(120)


def main() -> None:
    port, n, devices = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "all"
    prefix = sys.argv[5] if len(sys.argv) > 5 else "bench"  # device ids PREFIX-00000...: several publishers
    items = payloads(n, devices, prefix)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{time.time_ns()}", protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    if mode in ("all", "births"):
        publish_all(client, births(devices, prefix))
    if mode == "births":
        client.disconnect()
        client.loop_stop()
        print(json.dumps({"births": devices}))  # noqa: T201
        return
    # the reader waits for this line before we start the clock
    print(json.dumps({"ready": True, "payload_bytes": len(items[0][1])}), flush=True)  # noqa: T201
    sys.stdin.readline()
    start = time.time()
    publish_all(client, items)
    done = time.time()
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"start": start, "acked": done, "messages": n}), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()

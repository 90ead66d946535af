"""Crafting device traffic for controller tests."""

from __future__ import annotations

import time

from wire import codec, topics
from wire.messages import (
    AgentEvent,
    DeviceOffline,
    DeviceOnline,
    HardwareProfile,
    InferenceStats,
    LatencySummary,
    Telemetry,
)

HW = HardwareProfile(cpu_count=4, ram_bytes=2 * 2**30, arch="aarch64", os="Linux 6.1", onnxruntime="1.32.0")


def birth(
    device_id: str,
    *,
    keepalive: int = 30,
    interval: float = 10.0,
    labels: dict[str, str] | None = None,
    hw: HardwareProfile = HW,
) -> tuple[str, bytes]:
    msg = DeviceOnline(
        ts=time.time(),
        agent_version="0.1.0",
        hardware=hw,
        keepalive_s=keepalive,
        telemetry_interval_s=interval,
        labels=labels or {},
    )
    return topics.state(device_id), codec.encode(msg)


def offline(device_id: str, reason: str = "will") -> tuple[str, bytes]:
    return topics.state(device_id), codec.encode(DeviceOffline(ts=time.time(), reason=reason))  # type: ignore[arg-type]


def telemetry(device_id: str, seq: int, *, ts: float | None = None, count: int = 10) -> tuple[str, bytes]:
    latency = LatencySummary(p50_ms=1.0, p95_ms=2.0, p99_ms=3.0, mean_ms=1.2, max_ms=4.0, buckets=[(40, count)])
    msg = Telemetry(
        ts=ts if ts is not None else time.time(),
        seq=seq,
        interval_s=10,
        uptime_s=5,
        cpu_percent=3.5,
        rss_bytes=50_000_000,
        inference=InferenceStats(count=count, errors=1, latency=latency),
    )
    return topics.telemetry(device_id), codec.encode(msg)


def event(device_id: str, seq: int, kind: str = "started") -> tuple[str, bytes]:
    return topics.events(device_id), codec.encode(AgentEvent(ts=time.time(), seq=seq, kind=kind, message="hi"))

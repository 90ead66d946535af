"""Hostile payloads for the MQTT fuzz tests: random bytes, and valid messages mutated in many ways.

Every mutator takes a ``random.Random`` so hypothesis (``st.randoms()``) and the seeded broker runs
share them; nothing here is bounded by luck: sizes and depths have fixed limits.
"""

from __future__ import annotations

import copy
import json
import random
import time
from typing import Any

from wire import chunks as frames
from wire import codec
from wire.messages import (
    AgentEvent,
    ChunkRequest,
    CommandAck,
    DeploymentEvent,
    DeployState,
    DeviceOffline,
    DeviceOnline,
    HardwareProfile,
    InferenceStats,
    InstalledModel,
    LatencySummary,
    ModelRef,
    Telemetry,
)
from wire.topics import DeviceChannel

ART = "ab" * 32
HW = HardwareProfile(cpu_count=4, ram_bytes=2 * 2**30, arch="aarch64", os="Linux 6.1", onnxruntime="1.20.0")

#: values a hostile sender puts where a field was (types, bounds, sizes, JSON oddities)
JUNK: list[Any] = [
    None,
    True,
    0,
    -1,
    2**31,
    2**63,
    2**64 + 7,
    -(2**63) - 1,
    10**400,
    1e308,
    -1e-9,
    0.5,
    "",
    "x",
    "x" * 5000,
    "\u0000",
    "\ud800",
    "'; drop table telemetry; --",
    "../../../../etc/passwd",
    "slmfleet/v1/dev/+/cmd",
    [],
    [[1, 2], [3]],
    [[0, 2**63]],
    {},
    {"type": "online"},
    {"$ne": 1},
]
#: raw JSON texts json.dumps cannot make
RAW_JSON = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b'"\\ud800"', b"[" * 3000 + b"]" * 3000]


def birth() -> DeviceOnline:
    return DeviceOnline(
        ts=time.time(),
        agent_version="0.1.0",
        hardware=HW,
        installed=[InstalledModel(model="m", version=1, variant="fp32", artifact=ART)],
        labels={"site": "berlin"},
        keepalive_s=30,
        telemetry_interval_s=10.0,
        capabilities=["onnx"],
    )


def agent_event(seq: int = 1) -> AgentEvent:
    return AgentEvent(ts=time.time(), seq=seq, kind="started", message="agent started")


def telemetry(seq: int = 1) -> Telemetry:
    latency = LatencySummary(p50_ms=1.0, p95_ms=2.0, p99_ms=3.0, mean_ms=1.2, max_ms=4.0, buckets=[(40, 10)])
    return Telemetry(
        ts=time.time(),
        seq=seq,
        interval_s=10,
        uptime_s=5,
        cpu_percent=3.5,
        rss_bytes=50_000_000,
        temperature_c=41.0,
        model=ModelRef(model="m", version=1, variant="fp32"),
        inference=InferenceStats(count=10, errors=1, latency=latency),
    )


def control_templates() -> dict[DeviceChannel, list[dict[str, Any]]]:
    """Valid messages of the channels the controller consumes, as JSON-ready dicts."""
    now = time.time()
    events = [
        AgentEvent(ts=now, seq=1, kind="started", message="hi"),
        CommandAck(ts=now, seq=2, command_id="c-1", ok=True, detail="pong"),
        DeploymentEvent(
            ts=now, seq=3, deployment_id="dep-1", artifact_id=ART, state=DeployState.DOWNLOADING, chunks_total=5
        ),
        ChunkRequest(ts=now, seq=4, deployment_id="dep-1", artifact_id=ART, ranges=[(0, 2)]),
    ]
    return {
        DeviceChannel.STATE: [json.loads(codec.encode(birth())), json.loads(codec.encode(DeviceOffline(ts=now)))],
        DeviceChannel.TELEMETRY: [json.loads(codec.encode(telemetry()))],
        DeviceChannel.EVENTS: [json.loads(codec.encode(e)) for e in events],
    }


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return obj


def _delete(obj: Any, path: tuple[Any, ...]) -> Any:
    if not path:
        return obj
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    del parent[path[-1]]
    return obj


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")


def mutate_json(rng: random.Random, template: dict[str, Any]) -> bytes:
    """One to three structural mutations of ``template``, serialized; sometimes a byte-level one after."""
    obj = json.loads(json.dumps(template))
    for _ in range(rng.randint(1, 3)):
        paths = _paths(obj)
        path = rng.choice(paths)
        op = rng.randrange(6)
        if op == 0:
            obj = _set(obj, path, copy.deepcopy(rng.choice(JUNK)))
        elif op == 1 and path:
            obj = _delete(obj, path)
        elif op == 2 and isinstance(obj, dict):
            obj[rng.choice(["extra", "__proto__", "type", "v", "ts"])] = copy.deepcopy(rng.choice(JUNK))
        elif op == 3 and isinstance(obj, dict):
            obj["type"] = rng.choice(
                ["online", "offline", "telemetry", "agent", "ack", "deployment", "chunks", "deploy"]
            )
        elif op == 4:
            obj = [obj] if rng.random() < 0.5 else {"payload": obj}
        else:
            obj = _set(obj, path, rng.choice([float("nan"), float("inf"), -float("inf")]))
    data = _dumps(obj)
    return mutate_bytes(rng, data) if rng.random() < 0.25 else data


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Truncate, flip, insert, duplicate or replace with a raw oddity."""
    op = rng.randrange(6)
    if op == 0 and data:
        return data[: rng.randrange(len(data))]
    if op == 1 and data:
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if op == 2:
        at = rng.randrange(len(data) + 1)
        return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[at:]
    if op == 3:
        return data * rng.randint(2, 3)
    if op == 4:
        return rng.choice(RAW_JSON)
    return b"\xef\xbb\xbf" + data  # a byte-order mark


def hostile(rng: random.Random, templates: list[dict[str, Any]], max_size: int) -> bytes:
    """One hostile payload for a channel with these valid ``templates``."""
    kind = rng.randrange(10)
    if kind == 0:
        return rng.randbytes(rng.randrange(300))
    if kind == 1:
        return b""
    if kind == 2:  # just over the size cap, valid JSON otherwise
        return _dumps({**rng.choice(templates), "pad": "x" * max_size})
    if kind in (3, 4, 5):
        return boundary(rng, rng.choice(templates))
    return mutate_json(rng, rng.choice(templates))


#: values at the edges of what the schema allows (they may validate and still break a database)
EDGES: list[Any] = [0, 1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, 1e308, 5e-324, 32_503_680_000.0]


def boundary(rng: random.Random, template: dict[str, Any]) -> bytes:
    """The template with one or two numbers or strings pushed to an edge: often still a valid message."""
    obj = json.loads(json.dumps(template))
    for _ in range(rng.randint(1, 2)):
        leaves = [p for p in _paths(obj) if p and isinstance(_get(obj, p), (int, float, str)) and p[-1] != "type"]
        path = rng.choice(leaves)
        old = _get(obj, path)
        if isinstance(old, bool):
            continue
        if isinstance(old, str):
            new: Any = rng.choice(["", "a" * 64, "a" * 4096, "é" * 100, "a-b.c_d:e"])
        else:
            new = rng.choice(EDGES)
        obj = _set(obj, path, new)
    return _dumps(obj)


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def hostile_frame(rng: random.Random, artifact_id: str, genuine: list[bytes]) -> bytes:
    """A chunk frame that is not one of ``genuine``: malformed, of a wrong length, index or content."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(100))
    if kind == 1:  # a real header, other bytes
        index = rng.choice([0, 1, len(genuine), 2**32 - 1, rng.randrange(len(genuine))])
        return frames.encode(artifact_id, index, rng.randbytes(rng.randrange(2048)))
    if kind == 2:  # a genuine frame, damaged
        frame = bytearray(rng.choice(genuine))
        at = rng.randrange(frames.HEADER_SIZE, len(frame))
        frame[at] ^= 1 + rng.randrange(255)
        return bytes(frame)
    if kind == 3:  # a genuine frame truncated or extended
        whole = rng.choice(genuine)
        return whole[: rng.randrange(len(whole))] if rng.random() < 0.5 else whole + b"\x00"
    if kind == 4:  # header fields rewritten: magic, version, length
        header = bytearray(rng.choice(genuine))
        header[rng.choice([0, 4, 5, 12, 15])] ^= 0xFF
        return bytes(header)
    other = "cd" * 32  # another artifact's chunk
    return frames.encode(other, rng.randrange(len(genuine)), rng.randbytes(64))


def is_valid(channel: DeviceChannel, payload: bytes, max_size: int | None = None) -> bool:
    try:
        codec.decode(channel, payload, max_size)
    except codec.PayloadError:
        return False
    return True

"""What the hardening of issue 20 costs and saves, each against a baseline measured in the same run.

* ``oversize``: the controller's peak RSS growth (VmHWM) when a device publishes one huge message on its
  telemetry topic. As shipped (capped broker, MQTT 5 client announcing its limit) against the setup the
  issue measured (uncapped broker, a client that reads whatever comes: pinned to MQTT 3.1.1).
* ``seal``: the controller sealing a Deploy (a manifest of 1,000 chunks) for one device, against
  serializing it unsigned (what it did before).
* ``admit``: the agent parsing, verifying and remembering a sealed command, against validating it unsigned.
* ``chunk_check``: the controller reading a 256 KiB chunk and checking it against the manifest before
  sending it the first time (and reading it again for a repair), against reading it unchecked.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.core.guard import CommandGuard
from benchmarks.common import wait_for
from controller.broker.embedded import EmbeddedBroker, free_port
from controller.delivery.transfer import ChunkSource
from controller.registry.store import ContentStore
from wire import chunks as frames
from wire import codec, signing, topics
from wire.manifest import IO, Manifest, Task, TensorInfo, file_chunks
from wire.messages import Deploy, DeviceOnline, HardwareProfile, Telemetry
from wire.topics import DeviceChannel

MIB = 1024 * 1024


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _birth() -> bytes:
    hw = HardwareProfile(cpu_count=2, ram_bytes=2**30, arch="x86_64", os="Linux")
    return codec.encode(
        DeviceOnline(ts=time.time(), agent_version="bench", hardware=hw, keepalive_s=60, telemetry_interval_s=10)
    )


def _telemetry(seq: int) -> bytes:
    return codec.encode(Telemetry(ts=time.time(), seq=seq, interval_s=10, uptime_s=1, cpu_percent=1, rss_bytes=1))


def _client(port: int, client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    wait_for(client.is_connected, 10)
    return client


def _oversize_case(root: Path, size: int, capped: bool) -> dict[str, Any]:
    limit = None if capped else 268_435_455  # MQTT's own largest packet: no cap, as before
    broker = EmbeddedBroker(root / "broker", engine="mosquitto", max_packet_size=limit)
    broker.start()
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not capped:
        env["SLMFLEET_MQTT_PROTOCOL"] = "3.1.1"  # a client that reads whatever the broker sends
    args = ["up", "--data-dir", str(root / "ctl"), "--broker", broker.url, "--port", str(port)]
    log = open(root / "ctl.log", "wb")  # noqa: SIM115 - closed below
    ctl = subprocess.Popen([sys.executable, "-m", "slmfleet", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    api = f"http://127.0.0.1:{port}"
    clients: list[mqtt.Client] = []
    try:
        wait_for(lambda: _ready(api), 60, interval=0.2)
        big = _client(broker.port, "big")
        clients.append(big)
        big.publish(topics.state("dev-x"), _birth(), qos=1, retain=True).wait_for_publish(10)
        wait_for(lambda: httpx.get(api + "/api/v1/devices/dev-x", timeout=5).status_code == 200, 30, interval=0.2)
        time.sleep(1.0)  # let the controller settle before the peak is read
        before = _peak_rss(ctl.pid)
        info = big.publish(topics.telemetry("dev-x"), b"x" * size, qos=1)
        wait_for(lambda: info.is_published() or not big.is_connected(), 120, interval=0.05)
        # then a message stored once the controller has handled (or never got) the big one: from the same
        # client when the broker took the big one (it arrives after it), else from a new one
        sender = big if big.is_connected() else _client(broker.port, "sentinel")
        clients.append(sender)
        sender.publish(topics.telemetry("dev-x"), _telemetry(42), qos=1)
        wait_for(lambda: _stored(api, 42), 120, interval=0.2)
        after = _peak_rss(ctl.pid)
        return {
            "broker_hung_up": not big.is_connected(),
            "peak_rss_before_mib": round(before / MIB, 1),
            "peak_rss_after_mib": round(after / MIB, 1),
            "growth_mib": round((after - before) / MIB, 1),
        }
    finally:
        for c in clients:
            c.loop_stop()
        ctl.terminate()
        ctl.wait(30)
        log.close()
        broker.stop()


def _ready(api: str) -> bool:
    try:
        return bool(httpx.get(api + "/api/v1/health", timeout=2).json()["broker"]["connected"])
    except httpx.HTTPError:
        return False


def _stored(api: str, seq: int) -> bool:
    rows = httpx.get(api + "/api/v1/devices/dev-x/telemetry", timeout=5).json()
    return any(r["seq"] == seq for r in rows)


def _manifest(sha256: str, size: int, chunk_hashes: list[str]) -> Manifest:
    """A one-file manifest in chunks of 256 KiB."""
    return Manifest(
        model="bench",
        version=1,
        variant="fp32",
        task=Task.ANOMALY,
        io=IO(inputs=[TensorInfo(name="x", dtype="float32", shape=[1, 8])], outputs=[]),
        anomaly={"input": "x", "output": "s", "n_features": 8, "threshold": 0.5},  # type: ignore[arg-type]
        files=[{"path": "model.onnx", "sha256": sha256, "size": size}],  # type: ignore[list-item]
        chunks=file_chunks(0, size, chunk_hashes, 256 * 1024, 0),
        created_at=time.time(),
    )


def _deploy(chunks: int) -> Deploy:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(chunks)]
    manifest = _manifest("0" * 64, chunks * 256 * 1024, hashes)
    key = Ed25519PrivateKey.generate()
    return Deploy(ts=time.time(), command_id="d-1", deployment_id="d-1", manifest=signing.sign(manifest, key))


def _per_call(fn: Any, n: int) -> float:
    """Median seconds per call over 5 rounds of ``n`` calls."""
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n)
    return statistics.median(rounds)


def _commands(n: int) -> dict[str, Any]:
    command = _deploy(1000)
    key = Ed25519PrivateKey.generate()
    body = signing.command_body(command)
    devices = iter(range(10**9))
    seal = _per_call(
        lambda: signing.seal_command(body, key, device_id=f"d{next(devices)}", now=time.time(), ttl_s=3600), n
    )
    plain = _per_call(lambda: codec.encode(command), n)
    sealed = [signing.seal_command(body, key, device_id="dev", now=time.time(), ttl_s=3600) for _ in range(5 * n)]
    payloads_iter = iter(sealed)
    guard = CommandGuard("dev", key.public_key())

    def admit() -> None:
        obj, _ = codec.parse_command(next(payloads_iter))
        guard.admit(obj, time.time())

    admit_s = _per_call(admit, n)
    unsigned = codec.encode(command)
    decode_s = _per_call(lambda: codec.decode(DeviceChannel.CMD, unsigned), n)
    return {
        "deploy_payload_kib": len(unsigned) / 1024,
        "seal_ms": seal * 1000,
        "encode_unsigned_ms": plain * 1000,
        "seal_vs_unsigned": seal / plain,
        "admit_ms": admit_s * 1000,
        "decode_unsigned_ms": decode_s * 1000,
        "admit_vs_unsigned": admit_s / decode_s,
    }


def _chunk_check(root: Path, chunks: int) -> dict[str, Any]:
    store = ContentStore(root / "store")
    data = os.urandom(chunks * 256 * 1024)
    sha = store.put_bytes(data)
    hashes = [hashlib.sha256(data[o : o + 256 * 1024]).hexdigest() for o in range(0, len(data), 256 * 1024)]
    manifest = _manifest(sha, len(data), hashes)
    source = ChunkSource(manifest, store)
    indices = iter(i % chunks for i in range(10**9))
    checked = _per_call(lambda: source.frame(next(indices), recheck=True), chunks)
    repeat = _per_call(lambda: source.frame(next(indices)), chunks)  # checked once already: not hashed again

    def unchecked() -> bytes:
        ref = manifest.chunks[next(indices)]
        return frames.encode(source.artifact_id, ref.index, store.read_range(sha, ref.offset, ref.size))

    plain = _per_call(unchecked, chunks)
    return {
        "first_send_us": checked * 1e6,
        "repeat_send_us": repeat * 1e6,
        "unchecked_us": plain * 1e6,
        "first_vs_unchecked": checked / plain,
        "repeat_vs_unchecked": repeat / plain,
    }


def run(quick: bool = False) -> dict[str, Any]:
    size = (20 if quick else 100) * MIB
    with tempfile.TemporaryDirectory(prefix="bench-hardening-") as tmp:
        root = Path(tmp)
        shipped = _oversize_case(root / "shipped", size, capped=True)
        before = _oversize_case(root / "before", size, capped=False)
        result: dict[str, Any] = {
            "oversize_publish_mib": size / MIB,
            "oversize_shipped": shipped,
            "oversize_baseline_uncapped_311": before,
            "oversize_growth_ratio": (shipped["growth_mib"] + 1) / (before["growth_mib"] + 1),
            "commands": _commands(50 if quick else 300),
            "chunk_check": _chunk_check(root / "chunks", 16 if quick else 128),
        }
    return result

"""Artifact delivery: one artifact (>= 25 MB) to 50 real agents, against a bare paho fan-out of the same bytes.

Measured in one run, on one private mosquitto (the delivery settings of deploy/mosquitto/mosquitto.conf):

- baseline: the artifact's chunk frames (same chunk size, same QoS 1) published once by a bare paho
  client to one topic that N bare paho subscribers receive: from the first publish to the last
  subscriber's last frame;
- slmfleet: ``slmfleet up`` (a real controller process) deploys the artifact to N agents; the clock runs
  from the POST of the deployment until every device has *verified* it: every target past
  ``verifying`` (``staged``, ``activating`` or ``active``), i.e. all chunks held, every chunk and file
  hash checked and the self-test (load, warm-up, output checks) passed in the inactive slot. The times
  until every device held all chunks (reached ``verifying``) and was ``active`` are reported as well.

The agents are the real agent code path (AgentService: MQTT transport, AgentCore, DeploymentDriver
over disk slots, verification, self-test, switch), several of them in one asyncio process each
(``python -m benchmarks.delivery agents ...``), each with its own MQTT connection and data directory:
50 OS processes would measure the 2-core machine's scheduler more than delivery.

With ``SLMFLEET_BENCH_PROFILE=DIR`` in the environment each agents process runs under cProfile (its event
loop thread) and leaves ``agents-*.prof`` in DIR (slower: for where the time goes, not for figures).

Figures: ``ratio`` = baseline seconds / slmfleet seconds to verified (goal >= 0.5), ``chunks_lost``
= chunks that had to be repaired (goal 0), ``controller_bytes_ratio`` = chunk bytes the controller
published / artifact bytes (goal about 1, not N).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import JsonProc, wait_for
from controller.broker.embedded import EmbeddedBroker, free_port, mosquitto_binary

#: deploy/mosquitto/mosquitto.conf settings that matter for delivery and that the embedded broker's
#: configuration (max_inflight_messages 100, max_queued_messages 20000, tcp_nodelay) does not set already
DELIVERY_BROKER_CONFIG = "max_queued_bytes 268435456\nmax_packet_size 16777216"
PAST_VERIFYING = ("staged", "shadow", "activating", "active")
PAST_DOWNLOADING = ("verifying", *PAST_VERIFYING)
FEATURES = 8


# ----------------------------------------------------------------- artifact --


def big_model(path: Path, size_bytes: int, seed: int = 0) -> Path:
    """An anomaly model of about ``size_bytes`` random float weights: scores = mean(window @ W).

    ``window`` is [batch, 8] floats, ``W`` one [8, K] initializer, ``scores`` [batch]."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = max(1, size_bytes // (4 * FEATURES))
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((FEATURES, k), dtype=np.float32) * 0.01).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["window", "w"], ["h"]),
            helper.make_node("ReduceMean", ["h"], ["scores"], axes=[1], keepdims=0),
        ],
        "bench_delivery",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


BIG_MODEL_OPTIONS = {
    "task": "anomaly",
    "variants": ["fp32"],  # quantizing 25 MB of random weights is slow and beside the point here
    "anomaly": {"threshold": 0.0, "higher_is_anomalous": True, "output": "scores"},
}


# --------------------------------------------------------------- controller --


class Controller:
    """``slmfleet up`` as a child process on a free loopback port, against ``broker_url``.

    ``prefix`` runs it under another command (``ip netns exec NS``, benchmarks/links.py) listening on ``host``;
    ``broker_url`` None: on its embedded broker."""

    def __init__(
        self,
        root: Path,
        broker_url: str | None,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        host: str = "127.0.0.1",
    ) -> None:
        self.data_dir = root / "controller"
        self.port = free_port() if not prefix else 8080  # a namespace of its own: every port is free
        self.api = f"http://{host}:{self.port}"
        self.log_path = root / "controller.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        cmd = [*prefix, sys.executable, "-m", "slmfleet", "up", "--data-dir", str(self.data_dir)]
        cmd += ["--broker", broker_url] if broker_url else []
        cmd += ["--host", host, "--port", str(self.port)]
        self.popen = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self.client = httpx.Client(base_url=self.api, timeout=30)
        wait_for(self._up, 60, interval=0.1)
        self.client.headers["Authorization"] = f"Bearer {(self.data_dir / 'admin-token').read_text().strip()}"

    def _up(self) -> bool:
        if self.popen.poll() is not None:
            raise RuntimeError(f"slmfleet up exited with {self.popen.returncode}; see {self.log_path}")
        try:
            return bool(self.client.get("/api/v1/health", timeout=2).json()["broker"]["connected"])
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def register(self, name: str, path: Path, options: dict[str, Any]) -> dict[str, Any]:
        files = [("file", (path.name, path.read_bytes()))]
        r = self.client.post(
            f"/api/v1/models/{name}/versions", files=files, data={"options": json.dumps(options)}, timeout=600
        )
        if r.status_code != 201:
            raise RuntimeError(f"registering {path}: {r.status_code} {r.text[:2000]}")
        body: dict[str, Any] = r.json()
        return body

    def online(self) -> set[str]:
        page = self.client.get("/api/v1/devices", params={"limit": 1000}).json()
        return {d["id"] for d in page["items"] if d["status"] == "online"}

    def deploy(self, model: str, version: int, devices: list[str]) -> str:
        body = {"model": model, "version": version, "variant": "fp32", "target": {"devices": devices}}
        r = self.client.post("/api/v1/deployments", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"deploying: {r.status_code} {r.text[:2000]}")
        return str(r.json()["id"])

    def deployment(self, dep_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.client.get(f"/api/v1/deployments/{dep_id}").json()
        return body

    def metrics(self) -> str:
        return self.client.get("/metrics").text

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self.client.close()
        self._log.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (Prometheus text format)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_part = head.partition("{")
        if metric_name == name and all(w in label_part for w in want):
            total += float(value)
    return total


# ------------------------------------------------------------------- agents --


def device_ids(n: int) -> list[str]:
    return [f"bench-{i:03d}" for i in range(n)]


async def _agents_main(broker_url: str, key: Path, root: Path, ids: list[str]) -> None:
    """Run one AgentService per id in this process until a line arrives on stdin."""
    from agent.runtime.config import AgentSettings
    from agent.runtime.service import AgentService

    services = [
        AgentService(
            AgentSettings(
                device_id=device,
                broker=broker_url,
                data_dir=root / device,
                signing_key_file=key,
                reconnect_max_s=1.0,
                telemetry_interval_s=60.0,
                threads=1,
                ort_allow_spinning=False,
                log_level="WARNING",
            )
        )
        for device in ids
    ]
    tasks = [asyncio.create_task(s.run()) for s in services]
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + 120
    while not all(s.ready.is_set() for s in services):
        if time.monotonic() > deadline or any(t.done() for t in tasks):
            raise RuntimeError("agents did not start")
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": len(services)}), flush=True)  # noqa: T201
    await loop.run_in_executor(None, sys.stdin.readline)
    for s in services:
        s.request_stop()
    codes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    print(json.dumps({"stopped": len(services), "codes": [str(c) for c in codes]}), flush=True)  # noqa: T201


def agents_main(argv: list[str]) -> None:
    broker_url, key, root, ids = argv[0], Path(argv[1]), Path(argv[2]), argv[3].split(",")
    root.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        filename=str(root / f"agents-{ids[0]}.log"),
    )
    profile_to = os.environ.get("SLMFLEET_BENCH_PROFILE")  # a directory: cProfile this agents process there
    if not profile_to:
        asyncio.run(_agents_main(broker_url, key, root, ids))
        return
    import cProfile

    with cProfile.Profile() as prof:
        asyncio.run(_agents_main(broker_url, key, root, ids))
    prof.dump_stats(str(Path(profile_to) / f"agents-{ids[0]}-{os.getpid()}.prof"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------- baseline --


def subscribers_main(argv: list[str]) -> None:
    """``subscribers PORT TOPIC COUNT FRAMES``: COUNT bare paho clients (QoS 1) that each count FRAMES
    messages on TOPIC; prints ready once all subscribed, then the time the last one got its last frame."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    port, topic, count, frames = int(argv[0]), argv[1], int(argv[2]), int(argv[3])
    lock = threading.Lock()
    got = [0] * count
    nbytes = [0] * count
    last = [0.0] * count
    subscribed = threading.Event()
    done = threading.Event()
    n_subscribed = [0]
    clients = []

    def make(i: int) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-base-{os.getpid()}-{i}", protocol=mqtt.MQTTv311)

        def on_connect(client: mqtt.Client, *args: object) -> None:
            client.subscribe(topic, 1)

        def on_subscribe(*args: object) -> None:
            with lock:
                n_subscribed[0] += 1
                if n_subscribed[0] == count:
                    subscribed.set()

        def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
            got[i] += 1
            nbytes[i] += len(msg.payload)
            if got[i] == frames:
                last[i] = time.time()
                with lock:
                    if all(g >= frames for g in got):
                        done.set()

        c.on_connect = on_connect
        c.on_subscribe = on_subscribe
        c.on_message = on_message
        c.connect("127.0.0.1", port, keepalive=60)
        c.loop_start()
        return c

    for i in range(count):
        clients.append(make(i))
    subscribed.wait(60)
    print(json.dumps({"ready": subscribed.is_set()}), flush=True)  # noqa: T201
    done.wait(600)
    for c in clients:
        c.disconnect()
        c.loop_stop()
    cpu = os.times()
    result = {"last": max(last), "complete": sum(g >= frames for g in got), "bytes": sum(nbytes)}
    result["cpu_s"] = cpu.user + cpu.system
    print(json.dumps(result), flush=True)  # noqa: T201


def _frames(sizes: list[int], filler: bytes) -> list[bytes]:
    """Frames of the given payload sizes (the artifact's chunks), filled with ``filler``'s bytes."""
    from wire import chunks

    fake_id = "ab" * 32
    out, offset = [], 0
    for i, size in enumerate(sizes):
        data = filler[offset : offset + size]
        data += bytes(size - len(data))
        offset += size
        out.append(chunks.encode(fake_id, i, data))
    return out


def baseline(port: int, frames: list[bytes], subscribers: int, processes: int) -> dict[str, Any]:
    """The same frames, QoS 1, one publisher, ``subscribers`` bare paho subscribers in ``processes``."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    topic = "bench/delivery/baseline"
    per = _split(subscribers, processes)
    subs = [JsonProc("benchmarks.delivery", "subscribers", port, topic, n, len(frames)) for n in per]
    try:
        for s in subs:
            if not s.read(120)["ready"]:
                raise RuntimeError("baseline subscribers did not subscribe")
        pub = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-base-pub-{os.getpid()}", protocol=mqtt.MQTTv311
        )
        pub.max_inflight_messages_set(100)  # as many as the broker lets one client have in flight
        pub.connect("127.0.0.1", port, keepalive=60)
        pub.loop_start()
        wait_for(pub.is_connected, 30)
        start = time.time()
        infos = [pub.publish(topic, f, qos=1) for f in frames]
        for info in infos:
            info.wait_for_publish(300)
        acked = time.time()
        results = [s.read(600) for s in subs]
        pub.disconnect()
        pub.loop_stop()
        for s in subs:
            s.wait(60)
    finally:
        for s in subs:
            s.kill()
    last = max(r["last"] for r in results)
    complete = sum(r["complete"] for r in results)
    total = sum(len(f) for f in frames)
    return {
        "seconds": last - start,
        "publisher_acked_s": acked - start,
        "complete": complete,
        "bytes_received": sum(r["bytes"] for r in results),
        "aggregate_mb_per_s": total * subscribers / (last - start) / 1e6,
        "subscribers_cpu_s": sum(r["cpu_s"] for r in results),
    }


def _split(n: int, parts: int) -> list[int]:
    parts = max(1, min(parts, n))
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# ------------------------------------------------------------------ slmfleet --


def delivery(ctl: Controller, version: int, devices: list[str], timeout: float) -> dict[str, Any]:
    """Deploy and follow every target; returns when all are active (or ended)."""
    before = ctl.metrics()
    t0 = time.time()
    dep_id = ctl.deploy("bench", version, devices)
    downloaded: dict[str, float] = {}
    verified: dict[str, float] = {}
    active: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    dep: dict[str, Any] = {}
    for _ in range(int(timeout / 0.05) + 1):
        if time.monotonic() > deadline:
            break
        dep = ctl.deployment(dep_id)
        now = time.time()
        for t in dep["targets"]:
            state, device = t["state"], t["device_id"]
            if state in PAST_DOWNLOADING:
                downloaded.setdefault(device, now)
            if state in PAST_VERIFYING:
                verified.setdefault(device, now)
            if state == "active":
                active.setdefault(device, now)
        if dep["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.05)
    after = ctl.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    def median(times: dict[str, float]) -> float | None:
        values = sorted(t - t0 for t in times.values())
        return values[len(values) // 2] if values else None

    failed = {t["device_id"]: t["reason"] for t in dep.get("targets", []) if t["state"] != "active"}
    n = len(devices)
    return {
        "status": dep.get("status"),
        "not_active": failed,
        "seconds_all_downloaded": max(downloaded.values()) - t0 if len(downloaded) == n else None,
        "seconds_all_verified": max(verified.values()) - t0 if len(verified) == n else None,
        "seconds_all_active": max(active.values()) - t0 if len(active) == n else None,
        "median_downloaded": median(downloaded),
        "median_verified": median(verified),
        "chunks_broadcast": delta("slmfleet_chunks_published_total", kind="broadcast"),
        "chunks_repaired": delta("slmfleet_chunks_published_total", kind="repair"),
        "chunk_requests": delta("slmfleet_chunk_requests_total"),
        "bytes_broadcast": delta("slmfleet_chunk_bytes_published_total", kind="broadcast"),
        "bytes_repaired": delta("slmfleet_chunk_bytes_published_total", kind="repair"),
    }


class AgentHosts:
    """The agents: ``len(ids)`` AgentServices spread over ``processes`` child processes."""

    def __init__(self, broker_url: str, key: Path, root: Path, ids: list[str], processes: int) -> None:
        self.procs: list[JsonProc] = []
        start = 0
        for n in _split(len(ids), processes):
            group = ids[start : start + n]
            start += n
            self.procs.append(
                JsonProc("benchmarks.delivery", "agents", broker_url, key, root, ",".join(group), stdin=True)
            )
        for p in self.procs:
            p.read(180)

    def stop(self) -> None:
        for p in self.procs:
            try:
                p.send()
                p.read(90)
                p.wait(30)
            except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired):
                pass
            finally:
                p.kill()


def run(
    quick: bool = False, agents: int | None = None, size_mb: float | None = None, workdir: Path | None = None
) -> dict[str, Any]:
    """``workdir`` keeps the logs and data (a temporary directory otherwise)."""
    n = agents or (5 if quick else 50)
    size = int((size_mb or (2 if quick else 26)) * 1024 * 1024)
    processes = max(1, min(5, n // 10))
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-delivery-") as tmp_name:
        tmp = workdir or Path(tmp_name)
        engine = "mosquitto" if mosquitto_binary() else "amqtt"
        broker = EmbeddedBroker(tmp / "broker", engine=engine, extra_config=DELIVERY_BROKER_CONFIG)  # type: ignore[arg-type]
        broker.start()
        ctl: Controller | None = None
        hosts: AgentHosts | None = None
        try:
            model = big_model(tmp / "bench.onnx", size)
            ctl = Controller(tmp, broker.url)
            t_reg = time.time()
            version = ctl.register("bench", model, BIG_MODEL_OPTIONS)
            register_s = time.time() - t_reg
            fp32 = next(v for v in version["variants"] if v["variant"] == "fp32")
            artifact_bytes = int(fp32["size_bytes"])
            manifest = ctl.client.get(fp32["manifest_url"]).json()
            manifest = manifest.get("manifest", manifest)
            sizes = [int(c["size"]) for c in manifest["chunks"]]
            chunk_size = int(manifest["chunk_size"])
            key = tmp / "controller.pem"
            key.write_text(ctl.client.get("/api/v1/signing-key").json()["public_key_pem"])
            ids = device_ids(n)
            hosts = AgentHosts(broker.url, key, tmp / "agents", ids, processes)
            controller = ctl
            wait_for(lambda: set(ids) <= controller.online(), 120, interval=0.2)

            base = baseline(broker.port, _frames(sizes, model.read_bytes()), n, processes)
            time.sleep(1.0)  # let the broker and the machine settle between the phases
            pids = [p.popen.pid for p in hosts.procs]
            cpu0 = [cpu_seconds(p) for p in pids], cpu_seconds(ctl.popen.pid), cpu_seconds(broker.pid or 0)
            ours = delivery(ctl, int(version["number"]), ids, timeout=900)
            cpu1 = [cpu_seconds(p) for p in pids], cpu_seconds(ctl.popen.pid), cpu_seconds(broker.pid or 0)
        finally:
            if hosts is not None:
                hosts.stop()
            if ctl is not None:
                ctl.stop()
            broker.stop()
    verified_s = ours["seconds_all_verified"]
    sent = ours["bytes_broadcast"] + ours["bytes_repaired"]
    return {
        "agents": n,
        "agent_processes": processes,
        "broker": broker.engine,
        "artifact_bytes": artifact_bytes,
        "chunk_bytes": chunk_size,
        "chunks": len(sizes),
        "register_s": round(register_s, 2),
        "measured": "POST /deployments until every target is past verifying (staged/activating/active): "
        "all chunks, chunk and file hashes, self-test done",
        "baseline_bare_paho_s": round(base["seconds"], 3),
        "baseline_aggregate_mb_per_s": round(base["aggregate_mb_per_s"], 1),
        "baseline_subscribers_complete": base["complete"],
        "slmfleet_all_downloaded_s": _round(ours["seconds_all_downloaded"]),
        "slmfleet_all_verified_s": _round(verified_s),
        "slmfleet_median_device_downloaded_s": _round(ours["median_downloaded"]),
        "slmfleet_median_device_verified_s": _round(ours["median_verified"]),
        "slmfleet_all_active_s": _round(ours["seconds_all_active"]),
        "ratio": round(base["seconds"] / verified_s, 3) if verified_s else None,
        "ratio_download_only": round(base["seconds"] / ours["seconds_all_downloaded"], 3)
        if ours["seconds_all_downloaded"]
        else None,
        "goal_ratio": 0.5,
        "chunks_broadcast": int(ours["chunks_broadcast"]),
        "chunks_lost": int(ours["chunks_repaired"]),
        "chunk_requests": int(ours["chunk_requests"]),
        "controller_bytes_sent": int(sent),
        "controller_bytes_ratio": round(sent / artifact_bytes, 4),
        "cpu_s_baseline_subscribers": round(base["subscribers_cpu_s"], 2),
        "cpu_s_agents": round(sum(cpu1[0]) - sum(cpu0[0]), 2),
        "cpu_s_controller": round(cpu1[1] - cpu0[1], 2),
        "cpu_s_broker": round(cpu1[2] - cpu0[2], 2),
        "deployment_status": ours["status"],
        "not_active": ours["not_active"],
    }


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


if __name__ == "__main__":
    if sys.argv[1:2] == ["agents"]:
        agents_main(sys.argv[2:])
    elif sys.argv[1:2] == ["subscribers"]:
        subscribers_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m benchmarks.delivery agents|subscribers ... (or: python -m benchmarks delivery)")

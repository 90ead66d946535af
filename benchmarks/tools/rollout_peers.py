"""Protocol peers for the rollout benchmark: a process of many devices that speak the real wire protocol.

``python -m benchmarks.tools.rollout_peers PORT KEY_PEM_FILE SERVING_JSON FIRST COUNT [--canary N]
[--early N] [--fail ID ...] [--fail-delay S]`` starts devices ``bench-FIRST`` .. ``bench-FIRST+COUNT-1``,
each with its own MQTT connection, a retained birth that says it serves ``SERVING_JSON`` (an
InstalledModel) with the labels ``fleet=bench`` and ``ring=canary|early|late`` (by index), and then:

* on Deploy: checks the signed manifest, takes the chunks from the broadcast (or asks for repairs), checks
  each chunk's sha256, reports verifying, staged, activating and active (the new model); a device named
  by ``--fail`` instead reports failed after ``--fail-delay`` seconds (its self-test cannot load the model);
* on Cancel before the switch: reports cancelled; on Rollback: rolling_back, then rolled_back on the model
  it served before;
* a repeated Deploy reports where the deployment is, like the agent.

It prints one JSON line when every device is connected and its birth is out, then runs until stdin
closes or ``--max-s`` passes. No model runs: this measures the controller, not inference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from wire import chunks as frames
from wire import codec, signing, topics
from wire.manifest import Manifest
from wire.messages import (
    Cancel,
    ChunkRequest,
    Deploy,
    DeploymentEvent,
    DeployState,
    DeviceOnline,
    HardwareProfile,
    InstalledModel,
    Rollback,
)
from wire.topics import DeviceChannel

BEFORE_SWITCH = {DeployState.DOWNLOADING, DeployState.VERIFYING, DeployState.STAGED}


class Peer:
    def __init__(
        self,
        port: int,
        device_id: str,
        key: Any,
        serving: InstalledModel,
        labels: dict[str, str],
        fail: bool,
        delay: float,
    ) -> None:
        self.device_id = device_id
        self.labels = labels
        self.key = key
        self.serving = serving
        self.previous: InstalledModel | None = None
        self.fail = fail
        self.delay = delay
        self.manifest: Manifest | None = None
        self.deployment_id = ""
        self.chunks: dict[int, bytes] = {}
        self.state = DeployState.IDLE
        self.reason = ""
        self.seq = 0
        self.last_frame = 0.0
        self.lock = threading.RLock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-peer-{device_id}")
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.connected = threading.Event()
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe([(topics.cmd(self.device_id), 1), (topics.chunks(self.device_id), 1)])
        birth = DeviceOnline(
            ts=time.time(),
            agent_version="bench-peer",
            hardware=HardwareProfile(cpu_count=2, ram_bytes=2**31, arch="aarch64", os="Linux"),
            keepalive_s=60,
            telemetry_interval_s=60,
            labels=self.labels,
            installed=[self.serving],
        )
        client.publish(topics.state(self.device_id), codec.encode(birth), qos=1, retain=True)
        self.connected.set()

    # ---------------------------------------------------------------- --

    def report(self, state: DeployState, reason: str = "", installed: InstalledModel | None = None) -> None:
        m = self.manifest
        assert m is not None
        with self.lock:
            self.seq += 1
            self.state, self.reason = state, reason
            event = DeploymentEvent(
                ts=time.time(),
                seq=self.seq,
                deployment_id=self.deployment_id,
                artifact_id=m.artifact_id,
                state=state,
                progress=len(self.chunks) / max(len(m.chunks), 1),
                chunks_have=len(self.chunks),
                chunks_total=len(m.chunks),
                contiguous=len(self.chunks),
                reason=reason,
                installed=installed,
            )
        self.client.publish(topics.events(self.device_id), codec.encode(event), qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == topics.cmd(self.device_id):
            command = codec.decode(DeviceChannel.CMD, msg.payload)
            if isinstance(command, Deploy):
                self._deploy(client, command)
            elif isinstance(command, Cancel) and command.deployment_id == self.deployment_id:
                with self.lock:  # a switch in flight finishes first; the controller then sends a rollback
                    if self.state in BEFORE_SWITCH:
                        self.report(DeployState.CANCELLED, "cancelled by the controller")
            elif isinstance(command, Rollback) and command.deployment_id == self.deployment_id:
                threading.Thread(target=self._rollback, args=(command,), daemon=True).start()
            return
        self._frame(msg)

    def _deploy(self, client: Any, command: Deploy) -> None:
        if command.deployment_id == self.deployment_id and self.manifest is not None:
            installed = self.serving if self.state in (DeployState.ACTIVE, DeployState.ROLLED_BACK) else None
            self.report(self.state, self.reason, installed)  # a repeat: where we are
            return
        manifest = signing.verify(command.manifest, self.key)
        with self.lock:
            self.manifest, self.deployment_id = manifest, command.deployment_id
            self.chunks.clear()
            self.last_frame = time.time()
        client.subscribe(topics.artifact_chunks(manifest.artifact_id), 1)
        self.report(DeployState.DOWNLOADING)

    def _frame(self, msg: Any) -> None:
        try:
            frame = frames.decode(msg.payload)
        except frames.FrameError:
            return
        m = self.manifest
        if m is None or frame.artifact_id != m.artifact_id or self.state != DeployState.DOWNLOADING:
            return
        if hashlib.sha256(frame.data).hexdigest() != m.chunks[frame.index].sha256:
            return
        with self.lock:
            self.chunks[frame.index] = frame.data
            self.last_frame = time.time()
            complete = len(self.chunks) == len(m.chunks)
        if complete:
            threading.Thread(target=self._install, daemon=True).start()

    def _install(self) -> None:
        m = self.manifest
        assert m is not None
        with self.lock:
            if self.state != DeployState.DOWNLOADING:
                return
            self.state = DeployState.VERIFYING
        self.report(DeployState.VERIFYING)
        if self.fail:
            time.sleep(self.delay)  # the self-test takes a while before the model fails to load
            with self.lock:
                if self.state == DeployState.VERIFYING:
                    self.report(DeployState.FAILED, "self-test failed (load): the model does not load: out of memory")
            return
        with self.lock:  # the switch is atomic for commands: a cancel or rollback sees before or after
            if self.state != DeployState.VERIFYING:
                return  # cancelled meanwhile
            self.report(DeployState.STAGED)
            self.report(DeployState.ACTIVATING)
            self.previous = self.serving
            self.serving = InstalledModel(model=m.model, version=m.version, variant=m.variant, artifact=m.artifact_id)
            self.report(DeployState.ACTIVE, installed=self.serving)

    def _rollback(self, command: Rollback) -> None:
        with self.lock:
            if self.state == DeployState.ROLLED_BACK:
                self.report(DeployState.ROLLED_BACK, command.reason, installed=self.serving)  # a repeat
                return
            self.report(DeployState.ROLLING_BACK, command.reason)
            if self.previous is not None:
                self.serving, self.previous = self.previous, None
            self.report(DeployState.ROLLED_BACK, command.reason, installed=self.serving)

    def request_missing(self) -> None:
        """Ask for the chunks a stalled download misses (the broadcast may have started before we joined)."""
        m = self.manifest
        if m is None or self.state != DeployState.DOWNLOADING or time.time() - self.last_frame < 0.5:
            return
        missing = [i for i in range(len(m.chunks)) if i not in self.chunks]
        if not missing:
            return
        self.last_frame = time.time()
        with self.lock:
            self.seq += 1
            req = ChunkRequest(
                ts=time.time(),
                seq=self.seq,
                deployment_id=self.deployment_id,
                artifact_id=m.artifact_id,
                ranges=[(i, i + 1) for i in missing[:256]],
            )
        self.client.publish(topics.events(self.device_id), codec.encode(req), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tools.rollout_peers")
    parser.add_argument("port", type=int)
    parser.add_argument("key_file")
    parser.add_argument("serving", help="InstalledModel JSON")
    parser.add_argument("first", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--canary", type=int, default=0, help="devices 0..N-1 get the label ring=canary")
    parser.add_argument("--early", type=int, default=0, help="the next N get ring=early (the rest: ring=late)")
    parser.add_argument("--fail", nargs="*", default=[])
    parser.add_argument("--fail-delay", type=float, default=1.0)
    parser.add_argument("--max-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    key = signing.load_public_key(Path(args.key_file).read_text())
    serving = InstalledModel.model_validate_json(args.serving)
    fail = set(args.fail)
    peers = []
    for i in range(args.first, args.first + args.count):
        device_id = f"bench-{i:03d}"
        ring = "canary" if i < args.canary else "early" if i < args.canary + args.early else "late"
        labels = {"fleet": "bench", "ring": ring}
        peers.append(Peer(args.port, device_id, key, serving, labels, device_id in fail, args.fail_delay))
    deadline = time.monotonic() + 60
    for p in peers:
        p.connected.wait(max(0.0, deadline - time.monotonic()))
    print(json.dumps({"connected": sum(p.connected.is_set() for p in peers), "devices": len(peers)}), flush=True)

    closed = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        closed.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    end = time.monotonic() + args.max_s
    while not closed.wait(0.25) and time.monotonic() < end:  # bounded: stdin closes or --max-s passes
        for p in peers:
            p.request_missing()
    for p in peers:
        p.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A protocol peer that plays a device for controller-side delivery tests.

It speaks the real wire protocol over a real broker (births, commands, chunk frames, deployment events,
chunk requests) and checks what it receives against the signed manifest; it runs no model. The agent's
own deployment code is tested against a controller in tests/agent/deploy and tests/e2e.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from tests.helpers import RawMqtt
from wire import chunks as frames
from wire import codec, signing, topics
from wire.manifest import Manifest
from wire.messages import (
    ChunkRequest,
    Deploy,
    DeploymentEvent,
    DeployState,
    DeviceOnline,
    HardwareProfile,
    InstalledModel,
)
from wire.topics import DeviceChannel


class PeerDevice:
    def __init__(
        self,
        port: int,
        device_id: str,
        public_key_pem: str,
        *,
        ram_bytes: int = 4 * 2**30,
        labels: dict[str, str] | None = None,
        ignore_broadcast: bool = False,
        drop: set[int] | None = None,
        installed: list[InstalledModel] | None = None,
        lose_first_deploy: bool = False,
    ) -> None:
        self.device_id = device_id
        #: the first Deploy is as if lost on its way (a broker node died with it): not acted on, not answered
        self.lose_first_deploy = lose_first_deploy
        self.lost: list[Deploy] = []
        self.public_key = signing.load_public_key(public_key_pem)
        self.ignore_broadcast = ignore_broadcast
        self.drop = set(drop or ())
        self.installed = installed or []
        self.deploys: list[Deploy] = []
        self.commands: list[Any] = []
        self.manifest: Manifest | None = None
        self.deployment_id = ""
        self.chunks: dict[int, bytes] = {}
        self.from_broadcast = 0
        self.from_repair = 0
        self.bad_frames = 0
        self.state = DeployState.IDLE
        self._seq = 0
        self._lock = threading.Lock()
        self.mqtt = RawMqtt(port, f"peer-{device_id}")
        self.mqtt.client.on_message = self._on_message
        self.mqtt.subscribe(topics.cmd(device_id))
        self.mqtt.subscribe(topics.chunks(device_id))
        hw = HardwareProfile(cpu_count=2, ram_bytes=ram_bytes, arch="aarch64", os="Linux")
        birth = DeviceOnline(
            ts=time.time(),
            agent_version="peer",
            hardware=hw,
            keepalive_s=30,
            telemetry_interval_s=10,
            labels=labels or {},
            installed=self.installed,
        )
        self.mqtt.publish(topics.state(device_id), codec.encode(birth), retain=True)

    # ------------------------------------------------------------------ --

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def report(self, state: DeployState, reason: str = "", installed: InstalledModel | None = None) -> None:
        m = self.manifest
        assert m is not None
        total = len(m.chunks)
        contiguous = 0
        while contiguous in self.chunks:
            contiguous += 1
        event = DeploymentEvent(
            ts=time.time(),
            seq=self._next(),
            deployment_id=self.deployment_id,
            artifact_id=m.artifact_id,
            state=state,
            progress=len(self.chunks) / max(total, 1),
            chunks_have=len(self.chunks),
            chunks_total=total,
            contiguous=contiguous,
            listening=state == DeployState.DOWNLOADING and not self.ignore_broadcast,
            reason=reason,
            installed=installed,
        )
        self.state = state
        self.mqtt.client.publish(topics.events(self.device_id), codec.encode(event), qos=1)

    def request_missing(self, limit: int = 256, bad: list[int] | None = None) -> list[tuple[int, int]]:
        """Ask for the chunks it lacks (``bad``: chunks it says arrived damaged, as the agent reports them)."""
        m = self.manifest
        assert m is not None
        missing = [i for i in range(len(m.chunks)) if i not in self.chunks][:limit]
        ranges: list[tuple[int, int]] = []
        for i in missing:
            if ranges and ranges[-1][1] == i:
                ranges[-1] = (ranges[-1][0], i + 1)
            else:
                ranges.append((i, i + 1))
        if ranges:
            req = ChunkRequest(
                ts=time.time(),
                seq=self._next(),
                deployment_id=self.deployment_id,
                artifact_id=m.artifact_id,
                ranges=ranges[:256],
                bad=bad or [],
            )
            self.mqtt.client.publish(topics.events(self.device_id), codec.encode(req), qos=1)
        return ranges

    def complete(self) -> bool:
        return self.manifest is not None and len(self.chunks) == len(self.manifest.chunks)

    def assemble(self) -> dict[str, bytes]:
        """The bundle's files from the chunks, each checked against the manifest's sha256."""
        m = self.manifest
        assert m is not None
        files: dict[str, bytearray] = {f.path: bytearray() for f in m.files}
        for ref in m.chunks:
            files[m.files[ref.file].path] += self.chunks[ref.index]
        for f in m.files:
            assert hashlib.sha256(files[f.path]).hexdigest() == f.sha256, f.path
        return {k: bytes(v) for k, v in files.items()}

    def stop_listening(self) -> None:
        """Leave the artifact's broadcast, as the agent does once it holds every chunk."""
        if self.manifest is not None:
            self.mqtt.client.unsubscribe(topics.artifact_chunks(self.manifest.artifact_id))

    def finish(self) -> None:
        """Verify and report the remaining transitions up to ACTIVE."""
        m = self.manifest
        assert m is not None
        self.assemble()
        self.stop_listening()
        installed = InstalledModel(model=m.model, version=m.version, variant=m.variant, artifact=m.artifact_id)
        for state in (DeployState.VERIFYING, DeployState.STAGED, DeployState.ACTIVATING):
            self.report(state)
        self.report(DeployState.ACTIVE, installed=installed)

    # ------------------------------------------------------------------ --

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == topics.cmd(self.device_id):
            command = codec.decode(DeviceChannel.CMD, msg.payload)
            self.commands.append(command)
            if isinstance(command, Deploy):
                if self.lose_first_deploy and not self.lost:
                    self.lost.append(command)
                    return
                if command.deployment_id == self.deployment_id:
                    self.deploys.append(command)
                    return  # a repeat: nothing to restart
                self.manifest = signing.verify(command.manifest, self.public_key)
                self.deploys.append(command)  # after the manifest: tests wait on deploys, then read it
                self.deployment_id = command.deployment_id
                self.chunks.clear()
                if not self.ignore_broadcast:
                    client.subscribe(topics.artifact_chunks(self.manifest.artifact_id), 1)
                self.report(DeployState.DOWNLOADING)
            return
        try:
            frame = frames.decode(msg.payload)
        except frames.FrameError:
            self.bad_frames += 1
            return
        m = self.manifest
        if m is None or frame.artifact_id != m.artifact_id or self.state != DeployState.DOWNLOADING:
            return  # like the agent: frames count only while it downloads that artifact
        if frame.index in self.drop and msg.topic != topics.chunks(self.device_id):
            self.drop.discard(frame.index)
            return
        if hashlib.sha256(frame.data).hexdigest() != m.chunks[frame.index].sha256:
            self.bad_frames += 1
            return
        with self._lock:
            self.chunks[frame.index] = bytes(frame.data)
        if msg.topic == topics.chunks(self.device_id):
            self.from_repair += 1
        else:
            self.from_broadcast += 1
        if len(self.chunks) % 8 == 0 or self.complete():
            self.report(DeployState.DOWNLOADING)

    def close(self) -> None:
        self.mqtt.close()

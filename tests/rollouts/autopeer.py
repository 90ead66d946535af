"""Protocol peers that behave like devices on their own: download, switch, serve and report telemetry,
fail to load, serve slowly, disagree in shadow, roll back. For controller-side rollout tests; the real
agent is exercised in tests/e2e."""

from __future__ import annotations

import threading
import time
from typing import Any, Literal

from tests.delivery.peer import PeerDevice
from wire import codec, topics
from wire.histogram import bucket_index
from wire.messages import (
    Activate,
    Cancel,
    Commit,
    Deploy,
    DeployState,
    InferenceStats,
    InstalledModel,
    LatencySummary,
    ModelRef,
    Rollback,
    Telemetry,
)
from wire.topics import DeviceChannel

Behaviour = Literal["ok", "fail_load", "slow", "disagree", "errors"]


class AutoPeer(PeerDevice):
    def __init__(
        self,
        port: int,
        device_id: str,
        key: str,
        *,
        behaviour: Behaviour = "ok",
        serving: InstalledModel | None = None,
        base_ms: float = 10.0,
        telemetry_s: float = 0.3,
        **kw: Any,
    ) -> None:
        self.behaviour = behaviour
        self.serving = serving
        self.previous: InstalledModel | None = None
        self.base_ms = base_ms
        self.telemetry_s = telemetry_s
        self.waiting_activate = False
        self.telemetry_seq = 0
        self.serving_since = time.time()
        #: stages held back until release(): download, shadow, activate, rollback, telemetry
        self.held: dict[str, threading.Event] = {}
        self._stop = threading.Event()
        self._last_frame = time.time()
        self.last_reason = ""
        super().__init__(port, device_id, key, installed=[serving] if serving else [], **kw)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ --

    def hold(self, *stages: str) -> None:
        for stage in stages:
            self.held[stage] = threading.Event()

    def release(self, *stages: str) -> None:
        for stage in stages:
            event = self.held.pop(stage, None)
            if event is not None:
                event.set()

    def _wait(self, stage: str) -> None:
        event = self.held.get(stage)
        if event is not None:
            event.wait(120)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == topics.cmd(self.device_id):
            command = codec.decode(DeviceChannel.CMD, msg.payload)
            if isinstance(command, Activate) and command.deployment_id == self.deployment_id:
                self.commands.append(command)
                if self.waiting_activate:
                    self.waiting_activate = False
                    threading.Thread(target=self._switch, daemon=True).start()
                return
            if isinstance(command, Rollback):
                self.commands.append(command)
                threading.Thread(target=self._rollback, args=(command,), daemon=True).start()
                return
            if (
                isinstance(command, Deploy)
                and self.manifest is not None
                and command.deployment_id == self.deployment_id
            ):
                # A repeat (the controller re-sends unfinished commands when it (re)connects): like the agent
                # (DeploymentManager._repeat), restart nothing and report where the deployment is. Without this
                # a controller that missed the reports while it restarted would wait for them until the timeout.
                self.commands.append(command)
                self.deploys.append(command)
                installed = self.serving if self.state in (DeployState.ACTIVE, DeployState.ROLLED_BACK) else None
                self.report(self.state, reason=self.last_reason, installed=installed)
                return
            if isinstance(command, Cancel | Commit):
                self.commands.append(command)
                if isinstance(command, Cancel) and self.state not in (DeployState.ACTIVE, DeployState.ROLLED_BACK):
                    self.report(DeployState.CANCELLED)
                return
        else:
            self._last_frame = time.time()
        super()._on_message(client, userdata, msg)

    def _loop(self) -> None:
        next_telemetry = time.time()
        while not self._stop.wait(0.1):
            now = time.time()
            if self.manifest is not None and self.state == DeployState.DOWNLOADING:
                if "download" in self.held:
                    continue
                if self.complete():
                    self._after_download()
                elif now - self._last_frame > 0.5:
                    self._last_frame = now
                    self.request_missing()
            if now >= next_telemetry and "telemetry" not in self.held:
                next_telemetry = now + self.telemetry_s
                self._telemetry()

    def _after_download(self) -> None:
        assert self.manifest is not None
        self.assemble()
        self.stop_listening()
        self.report(DeployState.VERIFYING)
        if self.behaviour == "fail_load":
            self.report(DeployState.FAILED, reason="self-test failed: model failed to load (out of memory)")
            return
        self.report(DeployState.STAGED)
        deploy = self.deploys[-1]
        if deploy.shadow is not None:
            agreement = 0.5 if self.behaviour == "disagree" else 0.99
            self.state = DeployState.SHADOW
            self.report_metrics(DeployState.SHADOW, {"shadow_agreement": agreement, "shadow_samples": 1.0})
            self._wait("shadow")
            self.report_metrics(DeployState.SHADOW, {"shadow_agreement": agreement, "shadow_samples": 100.0})
        if deploy.activate:
            self._switch()
        else:
            self.waiting_activate = True

    def report(self, state: DeployState, reason: str = "", installed: InstalledModel | None = None) -> None:
        self.last_reason = reason
        super().report(state, reason=reason, installed=installed)

    def report_metrics(self, state: DeployState, metrics: dict[str, float]) -> None:
        from wire.messages import DeploymentEvent

        m = self.manifest
        assert m is not None
        event = DeploymentEvent(
            ts=time.time(),
            seq=self._next(),
            deployment_id=self.deployment_id,
            artifact_id=m.artifact_id,
            state=state,
            progress=1.0,
            metrics=metrics,
        )
        self.mqtt.client.publish(topics.events(self.device_id), codec.encode(event), qos=1)

    def _switch(self) -> None:
        m = self.manifest
        assert m is not None
        self._wait("activate")
        self.report(DeployState.ACTIVATING)
        self.previous = self.serving
        self.serving = InstalledModel(model=m.model, version=m.version, variant=m.variant, artifact=m.artifact_id)
        self.serving_since = time.time()
        self.report(DeployState.ACTIVE, installed=self.serving)

    def _rollback(self, command: Rollback) -> None:
        self._wait("rollback")
        self.report(DeployState.ROLLING_BACK, reason=command.reason)
        if self.previous is not None:
            self.serving = self.previous
            self.serving_since = time.time()
        self.report(DeployState.ROLLED_BACK, installed=self.serving)

    def _telemetry(self) -> None:
        serving = self.serving
        if serving is None:
            return
        new = self.manifest is not None and serving.version == self.manifest.version
        ms = self.base_ms * (3.0 if new and self.behaviour == "slow" else 1.0)
        count, errors = 50, (10 if new and self.behaviour == "errors" else 0)
        latency = LatencySummary(
            p50_ms=ms, p95_ms=ms, p99_ms=ms, mean_ms=ms, max_ms=ms, buckets=[(bucket_index(ms), count)]
        )
        msg = Telemetry(
            ts=time.time(),
            seq=self.telemetry_seq,
            interval_s=self.telemetry_s,
            uptime_s=1,
            cpu_percent=5,
            rss_bytes=100 * 2**20,
            model=ModelRef(model=serving.model, version=serving.version, variant=serving.variant),
            inference=InferenceStats(count=count, errors=errors, latency=latency),
            serving_s=time.time() - self.serving_since,
        )
        self.telemetry_seq += 1
        self.mqtt.client.publish(topics.telemetry(self.device_id), codec.encode(msg), qos=1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        super().close()

"""Real agent processes beside the virtual fleet (``slmfleet simulate --real N``, ``fleet.real_agents``).

Each is ``slmfleet agent`` as it runs on a device: its own data directory (spool, model slots, identity),
real chunk downloads over the simulation's broker, real onnxruntime self-tests and inference on the
registry's artifacts. What it cannot be is the scenario's hardware, so it *reports* its profile's RAM,
architecture, CPU count and disk (``report_hardware``: the controller picks variants as for that device)
while it runs at this machine's speed. Live inference: JSON lines written to its stdin at the profile's
rate (the agent's ``--input -``). Its truth is read from its local ``GET /v1/health`` (served model,
inferences, broker connection); its deployment state from the controller's deployment targets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from agent.transport.mqtt import parse_broker_url
from controller.broker.embedded import free_port
from controller.processes import die_with_parent
from simulations.device.proxy import LinkProxy
from simulations.device.real import SAMPLE_TEXTS
from simulations.plan import DeviceSpec

log = logging.getLogger(__name__)

#: faults on a real agent's link, applied by its loopback TCP proxy (``simulations.device.proxy``)
LINK_FAULTS = ("latency", "loss", "bandwidth", "disconnect")
#: fault kinds a real agent takes as the scenario says (the rest are reported as not applied)
APPLIED_FAULTS = ("power_loss", *LINK_FAULTS)
#: why each other fault cannot reach a real agent (shown in the report)
NOT_APPLIED = {
    "disk_full": "a real agent writes to this machine's disk",
    "corrupt_chunks": "chunks reach a real agent as the broker sent them",
    "model_crash": "a real agent runs the real model, which does not crash",
    "clock_skew": "a real agent uses this machine's clock",
}


@dataclass
class RealAgent:
    spec: DeviceSpec
    root: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    health: dict[str, Any] | None = None
    fed: int = 0
    dropped: int = 0
    #: inferences counted since the installed model served (the baseline), from health's ``processed``
    baseline_start: int | None = None
    restarts: int = 0
    down_until: float = 0.0
    power_loss_pending: list[dict[str, Any]] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.root.parent / f"{self.spec.id}.log"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class RealAgents:
    """Starts, feeds, watches and stops the real agents; thread-safe reads of their state."""

    def __init__(
        self,
        specs: list[DeviceSpec],
        root: Path,
        *,
        broker_url: str,
        public_key_pem: str,
        protocol: str = "auto",
        telemetry_interval_s: float = 5.0,
        keepalive_s: int = 60,
        log_level: str = "WARNING",
    ) -> None:
        self.root = root
        self.broker_url = broker_url
        self.protocol = protocol
        self.telemetry_interval_s = telemetry_interval_s
        self.keepalive_s = keepalive_s
        self.log_level = log_level
        root.mkdir(parents=True, exist_ok=True)
        self.key_file = root / "controller-key.pem"
        self.key_file.write_text(public_key_pem)
        self.agents = {s.id: RealAgent(s, root / s.id, free_port()) for s in specs}
        #: the loopback proxy of the agents whose faults touch their link (None when no fault does)
        self.links: LinkProxy | None = None
        self._broker_urls: dict[str, str] = {}
        linked = [s.id for s in specs if any(f["kind"] in LINK_FAULTS for f in s.faults)]
        if linked:
            broker = parse_broker_url(broker_url)
            self.links = LinkProxy(broker["host"], int(broker["port"]))
            scheme = broker_url.split("://", 1)[0]
            for device_id in linked:
                self._broker_urls[device_id] = f"{scheme}://127.0.0.1:{self.links.add(device_id)}"
        self.fault_events: list[tuple[float, str, str, str]] = []
        self.fault_counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client = httpx.Client(timeout=2.0)

    # -------------------------------------------------------------- start --

    def _providers_cache(self) -> Path | None:
        """onnxruntime's provider list, probed once for all agents (each would start a child to learn it)."""
        from agent.telemetry.system import PROVIDERS_CACHE, onnxruntime_info

        shared = self.root / "providers"
        shared.mkdir(exist_ok=True)
        onnxruntime_info(shared)
        cache = shared / PROVIDERS_CACHE
        return cache if cache.is_file() else None

    def start(self) -> None:
        cache = self._providers_cache()
        for agent in self.agents.values():
            agent.root.mkdir(parents=True, exist_ok=True)
            if cache is not None:
                shutil.copy(cache, agent.root / cache.name)
            self._launch(agent)
        for target, name in ((self._feed, "real-agents-feed"), (self._watch, "real-agents-health")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _config(self, agent: RealAgent) -> Path:
        spec = agent.spec
        hardware = {
            "ram_bytes": spec.ram_bytes,
            "disk_free_bytes": spec.disk_bytes,
            "cpu_count": spec.cpu_count,
            "arch": spec.arch,
            "os": spec.os,
        }
        lines = ["[agent]", f"labels = {_toml_table(spec.labels)}", f"report_hardware = {_toml_table(hardware)}"]
        path = agent.root.parent / f"{spec.id}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _launch(self, agent: RealAgent) -> None:
        cmd = [
            sys.executable,
            "-m",
            "slmfleet",
            "agent",
            "--config",
            str(self._config(agent)),
            "--broker",
            self._broker_urls.get(agent.spec.id, self.broker_url),
            "--device-id",
            agent.spec.id,
            "--data-dir",
            str(agent.root),
            "--signing-key-file",
            str(self.key_file),
            "--http-port",
            str(agent.port),
            "--input",
            "-",
            "--telemetry-interval",
            str(self.telemetry_interval_s),
            "--keepalive",
            str(self.keepalive_s),
            "--reconnect-max",
            "1",
            "--threads",
            "1",
            "--log-level",
            self.log_level,
        ]
        if self.protocol != "auto":
            cmd += ["--mqtt-protocol", self.protocol]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(agent.log_path, "ab") as log_file:
            agent.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - prctl only, no locks taken
            )
        assert agent.proc.stdin is not None
        os.set_blocking(agent.proc.stdin.fileno(), False)

    # ----------------------------------------------------------- threads --

    def _feed(self) -> None:
        """Live inputs at each device's rate: one JSON line per inference on its stdin."""
        rng = random.Random(0)
        tick = 0.05
        owed = dict.fromkeys(self.agents, 0.0)
        while not self._stop.wait(tick):
            for agent in list(self.agents.values()):
                if not agent.alive() or agent.proc is None or agent.proc.stdin is None:
                    continue
                owed[agent.spec.id] += agent.spec.inference_rate * tick
                n = int(owed[agent.spec.id])
                if not n:
                    continue
                owed[agent.spec.id] -= n
                lines = "".join(json.dumps({"text": rng.choice(SAMPLE_TEXTS)}) + "\n" for _ in range(n))
                stdin: IO[bytes] = agent.proc.stdin
                try:
                    # non-blocking and at most a few hundred bytes (a pipe writes up to PIPE_BUF whole or
                    # not at all): an agent whose queue is full drops inputs, it never stalls the others
                    os.write(stdin.fileno(), lines.encode())
                    agent.fed += n
                except BlockingIOError:
                    agent.dropped += n
                except (BrokenPipeError, OSError, ValueError):
                    continue  # the agent is down (a power loss): it gets inputs again once it is back

    def _watch(self) -> None:
        """Each agent's local health every half second, and restarts after a simulated power loss."""
        while not self._stop.wait(0.5):
            now = time.time()
            for agent in list(self.agents.values()):
                if agent.proc is None and agent.down_until and now >= agent.down_until:
                    agent.down_until = 0.0
                    agent.restarts += 1
                    self._launch(agent)
                if not agent.alive():
                    with self._lock:
                        agent.health = None
                    continue
                try:
                    body = self._client.get(f"http://127.0.0.1:{agent.port}/v1/health").json()
                except (httpx.HTTPError, ValueError):
                    body = None
                with self._lock:
                    agent.health = body

    # ------------------------------------------------------------- faults --

    def disconnect(self, device_id: str, down_s: float, detail: str) -> None:
        """A partition of the agent's link (its proxy aborts the connection and refuses it for ``down_s``)."""
        assert self.links is not None
        self.links.cut(device_id, down_s)
        with self._lock:
            self.fault_counts["disconnect"] = self.fault_counts.get("disconnect", 0) + 1
            self.fault_events.append((time.time(), device_id, "disconnect", detail))

    def power_loss(self, device_id: str, down_s: float, detail: str) -> None:
        """SIGKILL (no goodbye: the broker sends the will), then boot again from the data directory."""
        agent = self.agents[device_id]
        if agent.proc is None or not agent.alive():
            return
        agent.proc.kill()
        agent.proc.wait(10)
        with contextlib.suppress(OSError):
            if agent.proc.stdin is not None:
                agent.proc.stdin.close()
        agent.proc = None
        agent.down_until = time.time() + down_s
        with self._lock:
            self.fault_counts["power_loss"] = self.fault_counts.get("power_loss", 0) + 1
            self.fault_events.append((time.time(), device_id, "power_loss", detail))

    # -------------------------------------------------------------- reads --

    def health(self, device_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self.agents[device_id].health

    def processed(self, device_id: str) -> int:
        h = self.health(device_id)
        return int(h.get("processed", 0)) if h else 0

    def dead(self) -> list[str]:
        """Agents that exited on their own (not a simulated power loss): the run cannot go on with them."""
        return [d for d, a in self.agents.items() if a.proc is not None and a.proc.poll() is not None]

    def take_fault_events(self) -> list[tuple[float, str, str, str]]:
        with self._lock:
            events, self.fault_events = self.fault_events, []
        return events

    # --------------------------------------------------------------- stop --

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for agent in self.agents.values():
            proc = agent.proc
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for agent in self.agents.values():
            proc = agent.proc
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._client.close()
        if self.links is not None:
            self.links.stop()


def _toml_table(values: dict[str, Any]) -> str:
    """An inline TOML table of strings and integers (json.dumps quotes strings as TOML basic strings do)."""
    return "{" + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in values.items()) + "}"

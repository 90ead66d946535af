"""A 3-node NATS cluster with MQTT and JetStream on this machine, for the tests and the ingest benchmark.

Each node is a ``nats-server`` child process on free 127.0.0.1 ports (client, cluster route, MQTT, monitoring)
with its JetStream store in a directory of its own. The MQTT gateway keeps retained messages and sessions in
JetStream streams with ``stream_replicas: 3``, so they survive the loss of a node. The configuration is the one
``deploy/nats/`` ships, with loopback addresses and free ports (``node_config``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from controller.broker.embedded import free_port, port_open

CLUSTER_NAME = "slmfleet"


def nats_binary() -> str | None:
    """``nats-server`` on PATH (Debian: /usr/sbin), or None."""
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/local/bin/nats-server") if os.access(p, os.X_OK)), None
    )


def node_config(
    name: str,
    *,
    host: str,
    client_port: int,
    cluster_port: int,
    mqtt_port: int,
    monitor_port: int,
    routes: list[str],
    store_dir: Path | str,
    replicas: int = 3,
    max_payload: int = 8 * 1024 * 1024,
) -> str:
    """One node's nats-server configuration (the same shape as deploy/nats/node-*.conf)."""
    route_lines = "\n".join(f"    {r}" for r in routes)
    return f"""# slmfleet NATS node {name}: MQTT gateway + JetStream, one of a 3-node cluster
server_name: {name}
listen: {host}:{client_port}
http: {host}:{monitor_port}
max_payload: {max_payload}

jetstream {{
  store_dir: "{store_dir}"
  max_memory_store: 256MB
  max_file_store: 4GB
}}

cluster {{
  name: {CLUSTER_NAME}
  listen: {host}:{cluster_port}
  routes: [
{route_lines}
  ]
}}

mqtt {{
  listen: {host}:{mqtt_port}
  # retained messages, sessions and QoS 1 messages of MQTT subscribers live in JetStream: replicated on 3 nodes
  stream_replicas: {replicas}
  # how long the server waits for a PUBACK from an MQTT subscriber before it redelivers
  ack_wait: "30s"
  max_ack_pending: 1024
}}
"""


@dataclass
class NatsNode:
    name: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    monitor_port: int
    store_dir: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class NatsCluster:
    """Three nats-server processes in one cluster; ``start``/``stop``, ``kill(node)``, ``restart(node)``."""

    directory: Path
    size: int = 3
    nodes: list[NatsNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ports = [
            (free_port(), free_port(), free_port(), free_port())  # client, cluster, mqtt, monitor
            for _ in range(self.size)
        ]
        routes = [f"nats-route://127.0.0.1:{p[1]}" for p in ports]
        for i, (client, cluster, mqtt, monitor) in enumerate(ports):
            name = f"n{i + 1}"
            store = self.directory / name / "jetstream"
            store.mkdir(parents=True, exist_ok=True)
            conf = self.directory / name / "nats.conf"
            conf.write_text(
                node_config(
                    name,
                    host="127.0.0.1",
                    client_port=client,
                    cluster_port=cluster,
                    mqtt_port=mqtt,
                    monitor_port=monitor,
                    routes=[r for j, r in enumerate(routes) if j != i],
                    store_dir=store,
                    replicas=min(3, self.size),
                )
            )
            self.nodes.append(
                NatsNode(name, client, cluster, mqtt, monitor, store, conf, self.directory / name / "nats.log")
            )

    @property
    def mqtt_urls(self) -> str:
        """Every node's MQTT URL, comma-separated (what an agent's ``--broker`` takes)."""
        return ",".join(n.mqtt_url for n in self.nodes)

    @property
    def nats_urls(self) -> str:
        return ",".join(n.nats_url for n in self.nodes)

    def _spawn(self, node: NatsNode) -> None:
        binary = nats_binary()
        if binary is None:
            raise RuntimeError("nats-server not found")
        log = open(node.log_path, "ab")  # noqa: SIM115 - the child keeps the descriptor; closed here after fork
        try:
            node.process = subprocess.Popen(
                [binary, "-c", str(node.config_path)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            self._spawn(node)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0, nodes: list[NatsNode] | None = None) -> None:
        """Until every (given) node accepts MQTT and JetStream has a meta leader that sees every live node."""
        deadline = time.monotonic() + timeout
        wanted = nodes or [n for n in self.nodes if n.alive()]
        while time.monotonic() < deadline:
            if all(n.alive() for n in wanted) and all(self._ready(n) for n in wanted):
                return
            dead = [n for n in wanted if not n.alive()]
            if dead:
                raise RuntimeError(f"nats-server {dead[0].name} exited: {dead[0].log()[-2000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"NATS cluster not ready within {timeout:.0f}s: {self.nodes[0].log()[-2000:]}")

    def _ready(self, node: NatsNode) -> bool:
        if not port_open("127.0.0.1", node.mqtt_port):
            return False
        try:
            health = httpx.get(f"http://127.0.0.1:{node.monitor_port}/healthz?js-enabled-only=true", timeout=2)
            jsz = httpx.get(f"http://127.0.0.1:{node.monitor_port}/jsz", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        meta = jsz.get("meta_cluster") or {}
        return health.status_code == 200 and bool(meta.get("leader"))

    def kill(self, node: NatsNode) -> None:
        """SIGKILL one node (a crash or a lost machine)."""
        if node.process is not None and node.alive():
            os.kill(node.process.pid, signal.SIGKILL)
            node.process.wait(10)

    def freeze(self, node: NatsNode) -> None:
        """SIGSTOP one node: its connections stay open but nothing is answered (a hung machine)."""
        if node.process is not None and node.alive():
            os.kill(node.process.pid, signal.SIGSTOP)

    def restart(self, node: NatsNode, timeout: float = 60.0) -> None:
        self._spawn(node)
        self.wait_ready(timeout, [node])

    def _monitor(self, path: str, params: dict[str, str]) -> Iterator[tuple[NatsNode, dict[str, Any]]]:
        """Each live node's monitoring answer to ``path`` (nodes that do not answer are left out)."""
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                yield node, httpx.get(f"http://127.0.0.1:{node.monitor_port}{path}", params=params, timeout=2).json()
            except (httpx.HTTPError, ValueError):
                continue

    def node_of_client(self, client_id: str) -> NatsNode | None:
        """The live node an MQTT client (by client id) is connected to, from the nodes' /connz."""
        for node, connz in self._monitor("/connz", {"mqtt_client": client_id}):
            if connz.get("connections"):
                return node
        return None

    def stream_leader(self, stream: str) -> NatsNode | None:
        """The node leading a JetStream stream (e.g. ``$MQTT_rmsgs``, the MQTT retained messages), or None."""
        for _node, jsz in self._monitor("/jsz", {"accounts": "true", "streams": "true"}):
            for account in jsz.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream:
                        leader = (detail.get("cluster") or {}).get("leader")
                        return next((n for n in self.nodes if n.name == leader), None)
        return None

    def meta_leader(self) -> NatsNode | None:
        """The JetStream meta leader, when every live node names the same live one (after a node loss: elected
        again and known to all). Stream and consumer creation and deletion go through it."""
        named = {(jsz.get("meta_cluster") or {}).get("leader") for _node, jsz in self._monitor("/jsz", {})}
        if len(named) != 1:
            return None
        leader = next((n for n in self.nodes if n.name in named), None)
        return leader if leader is not None and leader.alive() else None

    def streams_led(self, streams: list[str]) -> bool:
        """Every one of ``streams`` has a live leader (after a node loss: elected again)."""
        leaders = [self.stream_leader(s) for s in streams]
        return all(leader is not None and leader.alive() for leader in leaders)

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            if node.process is not None and node.alive():
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(timeout)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(5)

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

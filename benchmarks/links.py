"""Thin and lossy links: real agents in network namespaces behind emulated links (``python -m benchmarks links``).

Topology (all created here, all removed at the end, even on failure): a ``hub`` namespace runs ``slmfleet up``
(REST API and its embedded mosquitto on the hub's address); each device is a namespace of its own with one veth
pair to the hub, addressed from a private 10.x.0.0/16 the host has no route into besides the hub's own /24 (the
host reaches the API through one more veth pair). A slow link is shaped on both ends: the hub side (what the
broker sends the device) and the device side.

Shaping: ``tc netem`` (rate, delay, loss) when the kernel has it; without ``sch_netem`` (this machine) the rate
comes from ``htb`` and the loss from ``u32`` filters that send the packets whose IP identification falls on
chosen values (about ``loss`` of them: TCP gives every segment, retransmissions included, a new id) to a class
whose queue holds nothing; there is no delay then besides the queue's. GSO is turned off on shaped links, so a
dropped packet is one segment, not 64 KiB.

Phases: (1) baseline: one model version broadcast to the fast devices alone; (2) the next version to every
device while a few are on the slow links and one device's link is down; (3) its link comes back and it gets the
model. Figures: per-class times from the deployment to the download done and to the model active, what the
slow devices held when the last fast device was done, the bytes the controller published (broadcast and
repairs, its metrics) and the bytes sent down each link (the hub's veth counters), against the artifact size.
Root (CAP_NET_ADMIN) and ``ip``/``tc`` needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import wait_for
from benchmarks.delivery import BIG_MODEL_OPTIONS, PAST_DOWNLOADING, Controller, big_model, metric

#: a Linux interface name is at most 15 characters
IFNAME_MAX = 15


class LinksUnavailable(RuntimeError):
    """Network namespaces or traffic control cannot be used here (not root, no ``ip``/``tc``)."""


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def netem_available() -> bool:
    """Whether ``tc qdisc ... netem`` works here (the kernel's sch_netem), tried on a veth pair of its own."""
    name = f"sfq{secrets.token_hex(3)}"
    try:
        _run("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p")
    except RuntimeError:
        return False
    try:
        _run("tc", "qdisc", "add", "dev", name, "root", "netem", "delay", "1ms")
        return True
    except RuntimeError:
        return False
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)


@dataclass
class Link:
    """One device's namespace and its veth pair to the hub."""

    name: str
    netns: str
    hub_if: str
    dev_if: str
    hub_addr: str
    addr: str
    rate_kbit: int | None = None
    loss_pct: float = 0.0
    delay_ms: float = 0.0

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.netns)


@dataclass
class Links:
    """The namespaces, veth pairs and shaping of one run; ``close()`` removes every one of them."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    netem: bool = field(default_factory=netem_available)
    links: dict[str, Link] = field(default_factory=dict)
    _namespaces: list[str] = field(default_factory=list)
    _host_if: str | None = None

    def __post_init__(self) -> None:
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
            raise LinksUnavailable("needs root and the ip and tc commands (iproute2)")
        self.net = self._free_net()
        self.hub = f"sf{self.tag}hub"
        self.hub_addr = f"10.{self.net}.0.2"
        try:
            self._add_netns(self.hub)
        except RuntimeError as exc:  # a container without CAP_SYS_ADMIN, a kernel without namespaces
            self.close()
            raise LinksUnavailable(f"cannot create a network namespace: {exc}") from None
        try:
            self._host_if = f"sf{self.tag}h0"
            _run("ip", "link", "add", self._host_if, "type", "veth", "peer", "name", f"sf{self.tag}h1")
            _run("ip", "link", "set", f"sf{self.tag}h1", "netns", self.hub)
            _run("ip", "addr", "add", f"10.{self.net}.0.1/24", "dev", self._host_if)
            _run("ip", "link", "set", self._host_if, "up")
            _run("ip", "-n", self.hub, "addr", "add", f"{self.hub_addr}/24", "dev", f"sf{self.tag}h1")
            _run("ip", "-n", self.hub, "link", "set", f"sf{self.tag}h1", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _free_net() -> int:
        """A second octet whose 10.x.0.0/16 the host routes nowhere yet (another run's, a real network's)."""
        routes = _run("ip", "-4", "route", "show", "table", "all")
        for _ in range(200):
            net = random.randint(64, 250)
            if f"10.{net}." not in routes:
                return net
        raise LinksUnavailable("no free 10.x.0.0/16 for the emulated links")

    @property
    def hub_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.hub)

    def _add_netns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._namespaces.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def add(self, name: str, rate_kbit: int | None = None, loss_pct: float = 0.0, delay_ms: float = 0.0) -> Link:
        """A device namespace on a link of its own: unshaped (a veth) or ``rate_kbit`` with ``loss_pct`` and
        ``delay_ms`` (delay only with netem) each way."""
        k = len(self.links) + 1
        if k > 250:
            raise ValueError("at most 250 devices")
        link = Link(
            name,
            f"sf{self.tag}d{k}",
            f"sf{self.tag}a{k}",
            f"sf{self.tag}b{k}",
            f"10.{self.net}.{k}.1",
            f"10.{self.net}.{k}.2",
            rate_kbit,
            loss_pct,
            delay_ms,
        )
        assert len(link.hub_if) <= IFNAME_MAX and len(link.dev_if) <= IFNAME_MAX
        self._add_netns(link.netns)
        _run("ip", "-n", self.hub, "link", "add", link.hub_if, "type", "veth", "peer", "name", link.dev_if)
        _run("ip", "-n", self.hub, "link", "set", link.dev_if, "netns", link.netns)
        _run("ip", "-n", self.hub, "addr", "add", f"{link.hub_addr}/24", "dev", link.hub_if)
        _run("ip", "-n", link.netns, "addr", "add", f"{link.addr}/24", "dev", link.dev_if)
        _run("ip", "-n", self.hub, "link", "set", link.hub_if, "up")
        _run("ip", "-n", link.netns, "link", "set", link.dev_if, "up")
        _run("ip", "-n", link.netns, "route", "add", "default", "via", link.hub_addr)
        if rate_kbit is not None:
            self._shape(self.hub, link.hub_if, link)
            self._shape(link.netns, link.dev_if, link)
        self.links[name] = link
        return link

    def _shape(self, netns: str, dev: str, link: Link) -> None:
        assert link.rate_kbit is not None
        tc = ("ip", "netns", "exec", netns, "tc")
        if self.netem:
            args = ["rate", f"{link.rate_kbit}kbit", "limit", "1000"]
            args += ["delay", f"{link.delay_ms}ms"] if link.delay_ms else []
            args += ["loss", f"{link.loss_pct}%"] if link.loss_pct else []
            _run(*tc, "qdisc", "add", "dev", dev, "root", "netem", *args)
            return
        # no netem: htb for the rate; the loss by the IP identification (6 low bits: 1/64 steps)
        _run("ip", "-n", netns, "link", "set", "dev", dev, "gso_max_size", "1500", "gso_max_segs", "1")
        rate = f"{link.rate_kbit}kbit"
        _run(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
        _run(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", rate, "ceil", rate)
        drops = round(link.loss_pct / 100 * 64)
        if drops:
            _run(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb", "rate", rate)
            _run(*tc, "qdisc", "add", "dev", dev, "parent", "1:20", "handle", "20:", "pfifo", "limit", "0")
            for i in range(drops):
                value = str((i * 64) // drops + 3)
                match = ("u32", "match", "u16", value, "0x3f", "at", "4", "flowid", "1:20")
                _run(*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", *match)

    def set_up(self, name: str, up: bool) -> None:
        """Take a device's link down (the hub side: nothing passes either way) or bring it back."""
        _run("ip", "-n", self.hub, "link", "set", self.links[name].hub_if, "up" if up else "down")

    def tx_bytes(self, name: str) -> int:
        """Bytes the hub sent down a device's link (the kernel's counter of the hub-side veth)."""
        out = json.loads(_run("ip", "-n", self.hub, "-j", "-s", "link", "show", "dev", self.links[name].hub_if))
        return int(out[0]["stats64"]["tx"]["bytes"])

    def dropped(self, name: str) -> int:
        """Packets the shaping dropped on the hub side of a device's link (the loss, and any queue overflow)."""
        out = json.loads(_run("tc", "-n", self.hub, "-j", "-s", "qdisc", "show", "dev", self.links[name].hub_if))
        return sum(int(q.get("drops", 0)) for q in out if q.get("root"))

    def close(self) -> None:
        """Remove every namespace (their veths go with them) and the host's veth; safe to call twice."""
        for netns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        self._namespaces.clear()
        if self._host_if is not None:
            subprocess.run(["ip", "link", "del", self._host_if], capture_output=True, timeout=30)
            self._host_if = None


# -------------------------------------------------------------------- fleet --


class Agent:
    """``slmfleet agent`` as a child process in its device's namespace."""

    def __init__(self, link: Link, broker_url: str, key: Path, root: Path, *extra: str) -> None:
        self.link = link
        self.log_path = root / f"{link.name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [*link.prefix, sys.executable, "-m", "slmfleet", "agent", "--broker", broker_url]
        cmd += ["--device-id", link.name, "--data-dir", str(root / link.name), "--signing-key-file", str(key)]
        cmd += ["--reconnect-max", "1", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()


@dataclass
class Phase:
    """One deployment watched until every device of it finished (or the time ran out)."""

    started: float
    downloaded: dict[str, float] = field(default_factory=dict)
    active: dict[str, float] = field(default_factory=dict)
    #: chunks each device held when the last of ``first`` had its download done
    held_when_first_done: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    states: dict[str, str] = field(default_factory=dict)


def watch(ctl: Controller, dep_id: str, devices: list[str], first: list[str], timeout: float) -> Phase:
    """Poll the deployment until each of ``devices`` is active (or failed): the time each got there."""
    phase = Phase(time.monotonic())
    deadline = phase.started + timeout
    while time.monotonic() < deadline:
        now = time.monotonic() - phase.started
        targets = {t["device_id"]: t for t in ctl.deployment(dep_id)["targets"]}
        for d in devices:
            t = targets.get(d)
            if t is None:
                continue
            phase.states[d] = t["state"]
            phase.chunks = max(phase.chunks, int(t.get("chunks_total") or 0))
            if t["state"] in PAST_DOWNLOADING:
                phase.downloaded.setdefault(d, now)
            if t["state"] == "active":
                phase.active.setdefault(d, now)
        if not phase.held_when_first_done and all(d in phase.downloaded for d in first):
            phase.held_when_first_done = {d: int(targets[d].get("chunks_have") or 0) for d in devices}
        if all(phase.states.get(d) in ("active", "failed") for d in devices):
            break
        time.sleep(0.2)
    return phase


def active_version(ctl: Controller, device_id: str, model: str) -> int | None:
    """The version of ``model`` the device reports active (its installed models, as the controller heard them)."""
    device = ctl.client.get(f"/api/v1/devices/{device_id}").json()
    active = [m for m in device.get("installed", []) if m.get("active") and m.get("model") == model]
    return int(active[0]["version"]) if active else None


@dataclass
class Setup:
    fast: int = 4
    slow: int = 2
    offline: int = 1
    size_bytes: int = 4 * 2**20
    chunk_size: int = 4096
    rate_kbit: int = 1000
    loss_pct: float = 5.0
    delay_ms: float = 20.0
    timeout_s: float = 240.0


def measure(root: Path, setup: Setup) -> dict[str, Any]:
    """The three phases (module docstring) on a fleet of ``setup``; raises LinksUnavailable without root."""
    links = Links()
    ctl: Controller | None = None
    agents: list[Agent] = []
    try:
        fast = [links.add(f"fast-{i}").name for i in range(setup.fast)]
        slow = [links.add(f"slow-{i}", setup.rate_kbit, setup.loss_pct, setup.delay_ms).name for i in range(setup.slow)]
        away = [links.add(f"away-{i}").name for i in range(setup.offline)]
        env = {"SLMFLEET_CHUNK_SIZE": str(setup.chunk_size), "SLMFLEET_EMBEDDED_BROKER_HOST": links.hub_addr}
        ctl = Controller(root, None, env=env, prefix=links.hub_prefix, host=links.hub_addr)
        versions = []
        for seed in (1, 2):
            path = big_model(root / f"m{seed}.onnx", setup.size_bytes, seed=seed)
            versions.append(ctl.register("links", path, BIG_MODEL_OPTIONS))
        artifact = next(v for v in versions[1]["variants"] if v["variant"] == "fp32")["size_bytes"]
        key = root / "controller.pem"
        key.write_text(ctl.client.get("/api/v1/signing-key").json()["public_key_pem"])
        broker = f"mqtt://{links.hub_addr}:1884"
        for name in fast + slow:
            agents.append(Agent(links.links[name], broker, key, root))
        for name in away:  # notices a dead link within seconds
            agents.append(Agent(links.links[name], broker, key, root, "--keepalive", "3"))
        every = fast + slow + away
        wait_for(lambda: set(every) <= ctl.online(), 90, interval=0.2)
        for name in away:
            links.set_up(name, False)

        def published() -> dict[str, float]:
            text = ctl.metrics()
            return {k: metric(text, "slmfleet_chunk_bytes_published_total", kind=k) for k in ("broadcast", "repair")}

        def sent() -> dict[str, int]:
            return {name: links.tx_bytes(name) for name in every}

        # (1) baseline: the fast devices alone
        pub0, tx0 = published(), sent()
        dep = ctl.deploy("links", versions[0]["number"], fast)
        base = watch(ctl, dep, fast, fast, setup.timeout_s)
        pub1, tx1 = published(), sent()
        wait_for(lambda: not set(away) & ctl.online(), 30, interval=0.2)

        # (2) everyone, the slow links included, one device cut off
        dep = ctl.deploy("links", versions[1]["number"], every)
        mixed = watch(ctl, dep, fast + slow, fast, setup.timeout_s)
        pub2, tx2 = published(), sent()
        # (3) the device comes back
        back_at = time.monotonic()
        for name in away:
            links.set_up(name, True)
        returned = watch(ctl, dep, away, away, setup.timeout_s)
        back = {d: round(returned.active[d] + returned.started - back_at, 2) for d in returned.active}
        pub3, tx3 = published(), sent()
        latest = versions[1]["number"]
        with contextlib.suppress(TimeoutError):  # a device's report of its installed models may trail its event
            wait_for(lambda: all(active_version(ctl, d, "links") == latest for d in every), 30, interval=0.2)
        active_versions = {d: active_version(ctl, d, "links") for d in every}

        def spread(values: list[float]) -> dict[str, float] | None:
            return {"min": round(min(values), 2), "max": round(max(values), 2)} if values else None

        def times(phase: Phase, group: list[str]) -> dict[str, Any]:
            return {
                "downloaded_s": spread([phase.downloaded[d] for d in group if d in phase.downloaded]),
                "active_s": spread([phase.active[d] for d in group if d in phase.active]),
                "finished": sum(phase.states.get(d) == "active" for d in group),
                "of": len(group),
            }

        def copies(before: dict[str, Any], after: dict[str, Any], group: list[str] | None = None) -> Any:
            if group is None:
                return {k: round((after[k] - before[k]) / artifact, 3) for k in before}
            return {d: round((after[d] - before[d]) / artifact, 3) for d in group}

        held = mixed.held_when_first_done
        result: dict[str, Any] = {
            "conditions": {
                "fast": setup.fast,
                "slow": setup.slow,
                "offline": setup.offline,
                "slow_link": f"{setup.rate_kbit} kbit/s, {setup.loss_pct}% loss"
                + (f", {setup.delay_ms} ms delay (netem)" if links.netem else " (htb + u32 loss; no netem: no delay)"),
                "fast_link": "veth, unshaped",
                "artifact_bytes": artifact,
                "chunk_size": setup.chunk_size,
                "chunks": mixed.chunks,
            },
            "baseline": {
                "fast": times(base, fast),
                "controller_copies": copies(pub0, pub1),
                "link_copies": copies(tx0, tx1, fast),
            },
            "mixed": {
                "fast": times(mixed, fast),
                "slow": times(mixed, slow),
                "slow_share_held_when_fast_done": {
                    d: round(held[d] / mixed.chunks, 3) if mixed.chunks else None for d in slow if d in held
                },
                "slow_chunks_held_when_fast_done": {d: held[d] for d in slow if d in held},
                "controller_copies": copies(pub1, pub2),
                "link_copies": copies(tx1, tx2, fast + slow),
                "hub_side_drops": {d: links.dropped(d) for d in slow},
            },
            "active_versions": active_versions,
            "versions": [v["number"] for v in versions],
            "offline": {
                "active_after_link_up_s": back,
                "finished": sum(returned.states.get(d) == "active" for d in away),
                "of": len(away),
                "controller_copies": copies(pub2, pub3),
                "link_copies": copies(tx2, tx3, away),
            },
        }
        base_fast = result["baseline"]["fast"]["downloaded_s"]
        mixed_fast = result["mixed"]["fast"]["downloaded_s"]
        if base_fast and mixed_fast:
            result["mixed"]["fast_vs_baseline"] = round(mixed_fast["max"] / max(base_fast["max"], 0.01), 2)
        return result
    finally:
        for agent in agents:
            agent.stop()
        if ctl is not None:
            ctl.stop()
        links.close()


def run(quick: bool = False) -> dict[str, Any]:
    setup = Setup(fast=3, slow=1, size_bytes=2 * 2**20) if quick else Setup()
    with tempfile.TemporaryDirectory(prefix="slmfleet-links-") as tmp:
        try:
            return measure(Path(tmp), setup)
        except LinksUnavailable as exc:
            return {"error": f"not available: {exc}"}


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2))

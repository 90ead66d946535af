"""The agent on a small device: one core and little memory, against the same agent unconstrained, same run.

Each condition runs real ``slmfleet agent`` processes:

- ``unconstrained``: every core of this machine, no memory limit (the baseline);
- ``one_core``: pinned to one core (``os.sched_setaffinity`` in the child, before the agent starts, so every
  thread it and onnxruntime start stays there; onnxruntime gets 1 intra-op thread) and, where cgroups let
  this process create a group, in a memory cgroup of ``MEMORY_LIMIT_MIB`` (cgroup v2 ``memory.max``, or v1
  ``memory.limit_in_bytes``; page cache counts in it). Where no group can be made, the output says
  ``memory_limit: "not enforced: <why>"``.

Measured per condition:

- RSS of an idle agent (connected, no model) and of an agent serving MiniLM int8 (after the inputs ran);
- inference: records/s of the agent over a JSON-lines file (the second of two passes, as in
  ``benchmarks agent``), and latency of single requests to its HTTP endpoint (p50/p95 of the round trip,
  one at a time);
- delivery: a 26 MiB model (``benchmarks.delivery.big_model``) deployed by a real controller
  (``slmfleet up``, unconstrained) to one agent: seconds from the POST until it held every chunk, was
  verified and self-tested, and active; the agent's CPU seconds for it, and its peak RSS (VmHWM) and the
  cgroup's peak (page cache included) afterwards.

``ratio`` fields are one_core / unconstrained (times: > 1 is slower).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.agent import MAX_BATCH, MIB, AgentRun, _results, _second_pass, _status, _texts, _tool
from benchmarks.common import start_broker, wait_for
from benchmarks.delivery import BIG_MODEL_OPTIONS, Controller, big_model, cpu_seconds, delivery
from controller.broker.embedded import EmbeddedBroker

MEMORY_LIMIT_MIB = 256
DELIVERY_MIB = 26


def _own_group(controller: str) -> str:
    """This process's cgroup path (relative) in the hierarchy of ``controller`` ("" : the v2 hierarchy)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        _id, names, path = line.split(":", 2)
        if (controller and controller in names.split(",")) or (not controller and _id == "0" and not names):
            return path.lstrip("/")
    return ""


class MemoryGroup:
    """A memory cgroup of this process's own (v2, else v1), or the reason there is none."""

    def __init__(self, name: str, limit_bytes: int) -> None:
        self.path: Path | None = None
        self.version = 0
        self.reason = ""
        # Below this process's own group (a child of it), not beside it: the limit and the accounting stay
        # inside whatever limits the benchmark itself runs under.
        v2 = Path("/sys/fs/cgroup") / _own_group("")
        v1 = Path("/sys/fs/cgroup/memory") / _own_group("memory")
        controllers = v2 / "cgroup.controllers"
        try:
            if controllers.exists() and "memory" in controllers.read_text().split():
                self.path, self.version = v2 / name, 2
                self.path.mkdir()
                (self.path / "memory.max").write_text(str(limit_bytes))
                (self.path / "memory.swap.max").write_text("0")
            elif (v1 / "memory.limit_in_bytes").exists():
                self.path, self.version = v1 / name, 1
                self.path.mkdir()
                (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            else:
                self.reason = "no cgroup memory controller (v2 or v1) on this host"
        except OSError as exc:
            self.reason = f"cannot create a memory cgroup: {exc.strerror or exc} ({exc.filename})"
        if self.path is not None and not self.reason:
            self.limit = int((self.path / ("memory.max" if self.version == 2 else "memory.limit_in_bytes")).read_text())

    @property
    def enforced(self) -> bool:
        return self.path is not None and not self.reason

    def join(self) -> None:
        """In the child, before exec: move this process into the group."""
        if self.enforced and self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int | None:
        if not self.enforced or self.path is None:
            return None
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def reset_peak(self) -> None:
        if self.enforced and self.path is not None and self.version == 1:
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def remove(self) -> None:
        if self.path is not None and self.enforced:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)  # its last process is still exiting


def _pin(core: int | None, group: MemoryGroup | None) -> Callable[[], None] | None:
    if core is None and group is None:
        return None

    def preexec() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})
        if group is not None:
            group.join()

    return preexec


def _latency(port: int, texts: list[str]) -> dict[str, float]:
    """Single requests one at a time to the HTTP endpoint: client round trip and the agent's latency_ms."""
    rtt, served = [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        client.post("/v1/infer", json={"text": texts[0]})  # warm
        for text in texts:
            t0 = time.perf_counter()
            body = client.post("/v1/infer", json={"text": text}).json()
            rtt.append(1000 * (time.perf_counter() - t0))
            served.append(float(body.get("latency_ms", 0.0)))
    rtt.sort()
    return {
        "p50_ms": round(statistics.median(rtt), 2),
        "p95_ms": round(rtt[int(0.95 * (len(rtt) - 1))], 2),
        "agent_latency_p50_ms": round(statistics.median(served), 2),
    }


def _serving(
    tmp: Path, broker: EmbeddedBroker, name: str, bundle: str, texts: list[str], n_latency: int, **kw: Any
) -> dict[str, Any]:
    inputs = tmp / f"{name}.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts + texts))
    out = tmp / name / "results.jsonl"
    run = AgentRun(
        tmp, broker, name, "--model", bundle, "--input", str(inputs), "--results", str(out),
        "--max-batch", str(MAX_BATCH), "--queue-size", "4096", http=True, **kw,
    )  # fmt: skip
    try:
        wait_for(lambda: len(_results(out)) >= 2 * len(texts) or run.proc.poll() is not None, 1800, interval=0.2)
        results = _results(out)
        if len(results) < 2 * len(texts):
            raise RuntimeError(f"agent {name} stopped early: {(run.dir / 'agent.log').read_text()[-3000:]}")
        amount, start, end = _second_pass(results, len(texts))
        cpu = run.cpu_between(start, end)
        latency = _latency(run.port, texts[:n_latency])
        memory = run.rss(1.0)
    finally:
        run.stop()
    return {
        "records_per_s": round(amount / (end - start), 1),
        "cpu_ms_per_record": round(1000 * cpu / amount, 3),
        "errors": sum(1 for r in results if "error" in r["result"]),
        **latency,
        "rss_mib": round(memory["rss_bytes"] / MIB, 1),
        "peak_rss_mib": round(memory["peak_rss_bytes"] / MIB, 1),
    }


def _idle(tmp: Path, broker: EmbeddedBroker, name: str, **kw: Any) -> float:
    run = AgentRun(tmp, broker, name, http=True, **kw)
    try:
        wait_for(lambda: (h := run.health()) is not None and h["broker_connected"], 60, interval=0.1)
        return round(run.rss(2.0)["rss_bytes"] / MIB, 1)
    finally:
        run.stop()


def _delivery(
    tmp: Path, broker: EmbeddedBroker, ctl: Controller, version: int, key: Path, name: str, **kw: Any
) -> dict[str, Any]:
    run = AgentRun(tmp, broker, name, "--signing-key-file", str(key), "--reconnect-max", "1", **kw)
    device = f"bench-{name}"
    try:
        wait_for(lambda: device in ctl.online(), 60, interval=0.1)
        cpu0 = cpu_seconds(run.proc.pid)
        result = delivery(ctl, version, [device], timeout=600)
        cpu1 = cpu_seconds(run.proc.pid)
        peak = _status(run.proc.pid)["VmHWM"]
    finally:
        run.stop()
    return {
        "status": result["status"],
        "downloaded_s": result["seconds_all_downloaded"] and round(result["seconds_all_downloaded"], 2),
        "verified_s": result["seconds_all_verified"] and round(result["seconds_all_verified"], 2),
        "active_s": result["seconds_all_active"] and round(result["seconds_all_active"], 2),
        "agent_cpu_s": round(cpu1 - cpu0, 2),
        "chunks_repaired": int(result["chunks_repaired"]),
        "agent_peak_rss_mib": round(peak / MIB, 1),
    }


def run(quick: bool = False) -> dict[str, Any]:
    n = 100 if quick else 300
    n_latency = 30 if quick else 100
    cores = sorted(os.sched_getaffinity(0))
    core = cores[-1]
    texts = _texts(n)
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-device-") as tmp_name:
        tmp = Path(tmp_name)
        made = _tool("benchmarks.tools.agent_bundles", tmp / "bundles", "minilm", timeout=3600)
        bundle = str(made["minilm-int8"])
        broker = start_broker(tmp / "broker")
        group = MemoryGroup(f"slmfleet-bench-device-{os.getpid()}", MEMORY_LIMIT_MIB * MIB)
        ctl: Controller | None = None
        out: dict[str, Any] = {}
        try:
            ctl = Controller(tmp, broker.url)
            version = int(
                ctl.register("bench", big_model(tmp / "big.onnx", DELIVERY_MIB * MIB), BIG_MODEL_OPTIONS)["number"]
            )
            key = tmp / "controller.pem"
            key.write_text(ctl.client.get("/api/v1/signing-key").json()["public_key_pem"])
            conditions: dict[str, dict[str, Any]] = {
                "unconstrained": {"threads": len(cores)},
                "one_core": {"threads": 1, "preexec": _pin(core, group if group.enforced else None)},
            }
            for label, kw in conditions.items():
                group.reset_peak()
                out[label] = {
                    "idle_rss_mib": _idle(tmp, broker, f"{label}-idle", **kw),
                    "minilm_int8": _serving(tmp, broker, f"{label}-serve", bundle, texts, n_latency, **kw),
                    "delivery_26mib": _delivery(tmp, broker, ctl, version, key, f"{label}-deliver", **kw),
                }
                peak = group.peak_bytes() if label == "one_core" else None
                if peak is not None:
                    out[label]["cgroup_peak_mib"] = round(peak / MIB, 1)
        finally:
            if ctl is not None:
                ctl.stop()
            broker.stop()
            group.remove()
    slow, base = out["one_core"], out["unconstrained"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    return {
        "cores_here": len(cores),
        "pinned_to_core": core,
        "memory_limit": f"{MEMORY_LIMIT_MIB} MiB (cgroup v{group.version})"
        if group.enforced
        else f"not enforced: {group.reason}",
        "records": n,
        "latency_requests": n_latency,
        **out,
        "ratio_records_per_s": ratio(slow["minilm_int8"]["records_per_s"], base["minilm_int8"]["records_per_s"]),
        "ratio_latency_p50": ratio(slow["minilm_int8"]["p50_ms"], base["minilm_int8"]["p50_ms"]),
        "ratio_delivery_active_s": ratio(slow["delivery_26mib"]["active_s"], base["delivery_26mib"]["active_s"]),
        "load_average_at_end": os.getloadavg()[0],
    }

"""Run a scenario end to end: infrastructure, models, fleet, rollout, faults, assertions, report.

The phases, each bounded by a deadline: start (or reach) the broker and the controller; register the
scenario's models through the REST API; start the worker processes and wait until every device is online
in the controller; deploy the installed version to the real-onnxruntime devices; let the fleet serve its
installed model until the gates have a baseline; create the rollout through the REST API; follow it
(device truth from the workers, rollout state and gates from the controller) until it ends and the fleet
settles; stop everything; evaluate the expectations; write ``report.json`` and ``report.html``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx
from rich.markup import escape

from agent.transport.mqtt import parse_broker_url
from simulations.assertions import evaluate
from simulations.console import Console
from simulations.device.agents import RealAgents
from simulations.errors import SimulationError
from simulations.infra import Api, BrokerHandle, ControllerHandle, process_cpu_s
from simulations.models import text_classifier
from simulations.plan import DeviceSpec, build_fleet, chunks_of
from simulations.populations import load_profile, wave_durations, wave_starts
from simulations.scenario import ModelSpec, Scenario, VersionSpec
from simulations.worker import WorkerConfig, worker_main
from wire.messages import DeployState

log = logging.getLogger(__name__)

STATE_NAMES = [s.value for s in DeployState]
#: rollout states in which the scenario's rollout is over (paused waits for an operator)
END_STATES = ("completed", "aborted", "paused")
#: device states in which a deployment is still moving
MOVING = ("downloading", "verifying", "staged", "shadow", "activating", "rolling_back")
WAITING = "not started"
OFFLINE = "offline"
#: the controller's counter of telemetry messages stored
INGESTED = "slmfleet_telemetry_ingested_total"


@dataclass
class RunOptions:
    out_dir: Path | None = None
    live: bool = True
    processes: int | None = None
    log_level: str = "WARNING"
    keep_data: bool = False
    sample_every_s: float = 0.5
    #: called (in the runner's thread) right after the rollout is created, with the runner: a test's hook to
    #: bring a fault the scenario file cannot describe (e.g. SIGKILL a node of a broker cluster it runs)
    on_rollout: Callable[[Runner], None] | None = None
    #: write the real agents' per-variant latency, memory and download rate here (a YAML a scenario's
    #: ``calibration.profile`` replays)
    record_profile: Path | None = None


@dataclass
class RunResult:
    ok: bool
    report: dict[str, Any]
    out_dir: Path
    json_path: Path
    html_path: Path
    failures: list[str] = field(default_factory=list)


@dataclass
class _WorkerHandle:
    index: int
    process: BaseProcess
    conn: Connection
    devices: list[DeviceSpec]
    booted: bool = False
    status: dict[str, Any] | None = None
    final: dict[str, Any] | None = None


def _version_key(value: str | int) -> str:
    return value if isinstance(value, str) else f"v{value}"


class Runner:
    """One run of one scenario (see the module docstring)."""

    def __init__(self, scenario: Scenario, options: RunOptions | None = None) -> None:
        self.scenario = scenario
        self.options = options or RunOptions()
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.out_dir = self.options.out_dir or Path("simulation-results") / f"{scenario.name}-{stamp}"
        self.console = Console(live=self.options.live, title=f"slmfleet simulate: {scenario.name}")
        self.broker: BrokerHandle | None = None
        self.controller: ControllerHandle | None = None
        self.api: Api | None = None
        self.workers: list[_WorkerHandle] = []
        self.devices: list[DeviceSpec] = []
        self.versions: dict[tuple[str, str], int] = {}
        self.variants: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.timeline: list[dict[str, Any]] = []
        self.fault_events: list[tuple[float, str, str, str]] = []
        self.phases: dict[str, float] = {}
        self.rollout: dict[str, Any] | None = None
        self.rollout_id: str | None = None
        self.t0: float | None = None
        self.ended_at: float | None = None
        self.cpu: dict[str, float | None] = {}
        self.notes: list[str] = []
        self._tmp: Path | None = None
        self._wave_of_dep: dict[str, int] = {}
        #: the real agent processes (``fleet.real_agents``), None without any
        self.real: RealAgents | None = None
        #: deployment id -> its targets as the controller last reported them (real agents' deployment state)
        self._targets: dict[str, dict[str, dict[str, Any]]] = {}
        self._finished_deps: set[str] = set()
        self._install_dep: str | None = None
        #: (device, deployment) -> state -> when the runner first saw the device in it
        self.first_seen: dict[tuple[str, str], dict[str, float]] = {}
        #: (real agent, fault id) -> how often a power loss or a partition of it fired
        self._real_fired: Counter[tuple[str, int]] = Counter()
        #: (model, version key, variant) -> the latency (ms, reference CPU) and download rate virtual devices use
        self._used_latency: dict[tuple[str, str, str], float] = {}
        self._used_download: dict[tuple[str, str, str], float] = {}

    # ------------------------------------------------------------------ run --

    def run(self) -> RunResult:
        started = time.time()
        self._tmp = Path(tempfile.mkdtemp(prefix=f"slmfleet-sim-{self.scenario.name}-"))
        error: str | None = None
        try:
            with self.console:
                self._run()
        except (SimulationError, TimeoutError) as exc:
            error = str(exc)
            self.console.log(f"[red]error:[/red] {escape(str(exc))}")
        finally:
            self._collect(error)  # while the controller still answers
            self._teardown()
        report = self._report(started, error)
        if self.options.record_profile is not None:
            try:
                self._record_profile(report)
            except (OSError, SimulationError) as exc:  # the report is still written
                self.notes.append(f"no profile recorded to {self.options.record_profile}: {exc}")
        result = self._write(report)
        if not self.options.keep_data and self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return result

    def _phase(self, name: str) -> None:
        self.phases[name] = time.time()
        self.console.phase(name)

    def _run(self) -> None:
        s = self.scenario
        assert self._tmp is not None
        self._phase("infrastructure")
        self.broker = BrokerHandle(s.broker.url, s.broker.engine, self._tmp / "broker")
        self.controller = ControllerHandle(
            url=s.controller.url,
            token=s.controller.token,
            broker_url=self.broker.url,
            data_dir=self._tmp / "controller",
            settings=s.controller.settings,
            amqtt=self.broker.engine == "amqtt",
        )
        self.api = self.controller.api
        self.console.log(f"broker {self.broker.url} ({self.broker.engine}), controller {self.controller.url}")
        self._phase("register")
        self._register()
        self._phase("fleet")
        self._start_fleet()
        self._real_onnx_install()
        self._phase("baseline")
        self._baseline()
        if s.rollout is None:
            self._phase("run")
            self._follow(until=time.time() + (s.limits.baseline_s or 10.0), rollout=False)
            return
        self._phase("rollout")
        self._create_rollout()
        self._follow(until=self.phases["infrastructure"] + s.limits.max_run_s, rollout=True)
        self._phase("settle")
        self._settle()

    # ------------------------------------------------------------- models --

    def _files(self, model: ModelSpec, version: VersionSpec) -> list[tuple[str, bytes]]:
        assert self._tmp is not None and version.key is not None
        if version.generator is not None:
            g = version.generator
            root = text_classifier(
                self._tmp / "models" / f"{model.name}-{version.key}",
                size_mb=g.size_mb,
                seed=g.seed,
                compute=g.compute,
                missing_words=tuple(g.missing_words),
            )
            return [(p.name, p.read_bytes()) for p in sorted(root.iterdir()) if p.is_file()]
        assert version.path is not None
        path = version.path
        if path.is_dir():
            return [(p.relative_to(path).as_posix(), p.read_bytes()) for p in sorted(path.rglob("*")) if p.is_file()]
        return [(path.name, path.read_bytes())]

    def _register(self) -> None:
        assert self.api is not None
        for model in self.scenario.models:
            for version in model.versions:
                assert version.key is not None
                files = self._files(model, version)
                options: dict[str, Any] = {"task": model.task, **version.options}
                if version.variants:
                    options["variants"] = version.variants
                started = time.monotonic()
                body = self.api.post(
                    f"/api/v1/models/{model.name}/versions",
                    files=[("file", (name, data)) for name, data in files],
                    data={"options": json.dumps(options)},
                    params={"wait": 900},
                    ok=(201, 202),
                    timeout=960,
                )
                if "variants" not in body:  # 202: the import goes on; poll its job
                    body = self._wait_import(model.name, body)
                number = int(body["number"])
                self.versions[(model.name, version.key)] = number
                for v in body["variants"]:
                    self.variants[(model.name, version.key, v["variant"])] = {
                        "artifact_id": v["artifact_id"],
                        "min_ram_bytes": int(v["requirements"].get("min_ram_bytes", 0)),
                        "min_disk_bytes": int(v["requirements"].get("min_disk_bytes", 0)),
                        "size_bytes": int(v["size_bytes"]),
                        "latency_ms_p50": (v.get("metrics") or {}).get("latency_ms_p50"),
                        "latency_ms_p95": (v.get("metrics") or {}).get("latency_ms_p95"),
                        "peak_rss_bytes": (v.get("metrics") or {}).get("peak_rss_bytes"),
                    }
                sizes = ", ".join(f"{v['variant']} {v['size_bytes'] / 1e6:.2f} MB" for v in body["variants"])
                self.console.log(
                    f"registered {model.name} {version.key} as version {number} ({sizes}) in"
                    f" {time.monotonic() - started:.1f}s"
                )

    def _wait_import(self, model: str, job: dict[str, Any]) -> dict[str, Any]:
        assert self.api is not None
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            job = self.api.get(f"/api/v1/imports/{job['id']}")
            if job["status"] == "failed":
                raise SimulationError(f"importing {model} failed: {job.get('error')}")
            if job["status"] == "succeeded" and job.get("version"):
                return self.api.get(f"/api/v1/models/{model}/versions/{job['version']}")
            time.sleep(1.0)
        raise SimulationError(f"importing {model} did not finish within 30 minutes")

    def _behaviours(self) -> dict[str, dict[str, Any]]:
        """Each version's behaviour for the workers, calibrated as ``scenario.calibration`` says: measured
        latency per variant from the recorded profile, else from the registry's measurement at import; RSS
        per variant from the recorded profile (else the registry's peak RSS, which virtual devices report
        already, times ``rss_factor`` unless memory is measured)."""
        cal = self.scenario.calibration
        recorded = load_profile(cal.profile) if cal.profile is not None else {}
        table = {}
        for model in self.scenario.models:
            for version in model.versions:
                assert version.key is not None
                number = self.versions[(model.name, version.key)]
                behaviour = version.behaviour.model_dump()
                variant_ms: dict[str, float] = {}
                variant_rss: dict[str, int] = {}
                for (m, k, variant), info in self.variants.items():
                    if (m, k) != (model.name, version.key):
                        continue
                    rec = recorded.get((m, k, variant), {})
                    if cal.latency == "measured":
                        ms = rec.get("latency_ms_p50") or info.get("latency_ms_p50")
                        if ms:
                            variant_ms[variant] = float(ms)
                    if cal.memory == "measured":
                        behaviour["rss_factor"] = 1.0
                        if rec.get("rss_bytes"):
                            variant_rss[variant] = int(rec["rss_bytes"])
                    assumed = version.behaviour.latency_ms * model.variant_latency.get(variant, 1.0)
                    self._used_latency[(m, k, variant)] = round(variant_ms.get(variant) or assumed, 3)
                    if rec.get("download_bytes_per_s"):
                        self._used_download[(m, k, variant)] = rec["download_bytes_per_s"]
                table[f"{model.name}@{number}"] = {
                    **behaviour,
                    "variant_latency": model.variant_latency,
                    "variant_agreement_loss": model.variant_agreement_loss,
                    "variant_ms": variant_ms,
                    "variant_rss": variant_rss,
                }
        return table

    # -------------------------------------------------------------- fleet --

    def _start_fleet(self) -> None:
        s, api = self.scenario, self.api
        assert api is not None and self.broker is not None and self._tmp is not None
        self.devices = build_fleet(s, variants=self.variants, versions=self.versions)
        n = len(self.devices)
        virtual = [d for d in self.devices if not d.real_agent]
        self._calibrate_links(virtual)
        processes = self.options.processes or s.fleet.processes or math.ceil(len(virtual) / s.fleet.devices_per_process)
        if not virtual:
            processes = 0
        key = api.get("/api/v1/signing-key")["public_key_pem"]
        installed = {d.installed_artifact for d in self.devices if d.installed_artifact}
        manifests = {a: api.get(f"/api/v1/artifacts/{a}/manifest") for a in installed}
        broker = parse_broker_url(self.broker.url)
        if self.broker.engine == "amqtt":
            broker["protocol"] = "3.1.1"
        elif s.broker.protocol != "auto":
            broker["protocol"] = s.broker.protocol
        baseline = None
        if s.fleet.installed is not None:
            number = self.versions[(s.fleet.installed.model, _version_key(s.fleet.installed.version))]
            baseline = (s.fleet.installed.model, number)
        ctx = multiprocessing.get_context("spawn")
        behaviours = self._behaviours()
        for i, bucket in enumerate(chunks_of(virtual, processes) if virtual else []):
            config = WorkerConfig(
                index=i,
                broker=broker,
                public_key_pem=key,
                data_dir=str(self._tmp / f"worker-{i}"),
                devices=bucket,
                behaviours=behaviours,
                manifests={a: m for a, m in manifests.items() if any(d.installed_artifact == a for d in bucket)},
                deploy=dict(s.fleet.deploy),
                telemetry_interval_s=s.fleet.telemetry_interval_s,
                keepalive_s=s.fleet.keepalive_s,
                connect_rate=s.fleet.connect_rate / processes,
                seed=s.seed,
                share_chunk_hashes=s.fleet.share_chunk_hashes,
                baseline=baseline,
                log_level=self.options.log_level,
            )
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=worker_main, args=(config, child), name=f"slmfleet-sim-worker-{i}", daemon=True
            )
            process.start()
            child.close()
            self.workers.append(_WorkerHandle(i, process, parent, bucket))
        self._start_real_agents(key, broker)
        self.console.log(
            f"{len(virtual)} virtual devices in {len(self.workers)} worker processes"
            + (f", {n - len(virtual)} real agent processes" if self.real else "")
        )
        deadline = time.time() + s.limits.ready_timeout_s
        prefix = f"{s.fleet.prefix}-"
        online = 0
        while time.time() < deadline:
            self._poll(0.5)
            connected = self._connected()
            if connected >= n:
                online = api.count_devices(status="online", q=prefix)
                if online >= n:
                    break
            self._sample()
        else:
            raise SimulationError(
                f"the fleet was not online within {s.limits.ready_timeout_s:.0f}s: {self._connected()} of {n} devices"
                f" connected, {online} online in the controller"
            )
        self.console.log(f"{n} devices online in {time.time() - self.phases['fleet']:.1f}s")

    def _calibrate_links(self, virtual: list[DeviceSpec]) -> None:
        """``calibration.download: measured``: every virtual device's link runs at the real agents' recorded
        download rate (the median over the recorded variants), applied as a bandwidth cap from the start."""
        cal = self.scenario.calibration
        if cal.download != "measured" or cal.profile is None:
            return
        rates = [e["download_bytes_per_s"] for e in load_profile(cal.profile).values() if e.get("download_bytes_per_s")]
        if not rates:
            self.notes.append(f"calibration.download: measured, but {cal.profile} has no download rate: link assumed")
            return
        rate = float(statistics.median(rates))
        self.link_bytes_per_s = rate
        for d in virtual:
            d.faults.append(
                {
                    "id": -1,
                    "kind": "bandwidth",
                    "bytes_per_s": rate,
                    "at_s": None,
                    "duration_s": None,
                    "calibration": True,
                }
            )

    def _start_real_agents(self, key: str, broker: dict[str, Any]) -> None:
        s = self.scenario
        specs = [d for d in self.devices if d.real_agent]
        if not specs:
            return
        assert self.broker is not None and self._tmp is not None
        self.real = RealAgents(
            specs,
            self._tmp / "agents",
            broker_url=self.broker.url,
            public_key_pem=key,
            protocol=str(broker.get("protocol", "auto")),
            telemetry_interval_s=s.fleet.telemetry_interval_s,
            keepalive_s=s.fleet.keepalive_s,
            log_level="WARNING" if self.options.log_level == "WARNING" else self.options.log_level,
        )
        self.real.start()

    def _real_onnx_install(self) -> None:
        """Real-onnxruntime devices and real agents get the installed version over the air (real files need
        real bytes)."""
        s, api = self.scenario, self.api
        assert api is not None
        real = [d.id for d in self.devices if d.real_onnx or d.real_agent]
        if not real or s.fleet.installed is None:
            return
        number = self.versions[(s.fleet.installed.model, _version_key(s.fleet.installed.version))]
        dep = api.post(
            "/api/v1/deployments",
            json={"model": s.fleet.installed.model, "version": number, "devices": real, "timeout_s": 300},
        )
        self._install_dep = dep["id"]
        deadline = time.time() + 300
        while time.time() < deadline:
            self._poll(0.5)
            self._sample()
            body = api.get(f"/api/v1/deployments/{dep['id']}")
            if body["status"] != "running":
                if body["status"] != "completed":
                    reasons = {t["device_id"]: t["reason"] for t in body["targets"] if t["state"] != "active"}
                    raise SimulationError(f"installing the real-onnxruntime devices failed: {reasons}")
                self.console.log(f"{len(real)} real-onnxruntime devices and real agents installed over the air")
                return
        raise SimulationError("installing the real-onnxruntime devices did not finish within 300s")

    def _baseline(self) -> None:
        """Serve the installed model until the gates have their minimum samples on it (the baseline)."""
        s, api = self.scenario, self.api
        assert api is not None
        if s.fleet.installed is None:
            return
        limits = s.limits
        if limits.baseline_s is not None:
            end = time.time() + limits.baseline_s
            while time.time() < end:
                self._poll(0.5)
                self._sample()
        else:
            from controller.rollouts.gates import MIN_INTERVALS

            need = int(((s.rollout or {}).get("gates") or {}).get("min_samples", 100))
            # the latency and memory gates judge a device only on MIN_INTERVALS telemetry reports of the version
            # before (the bootstrap resamples them): fewer, and a wave's gate is "off" for want of a baseline
            reports_s = (MIN_INTERVALS + 1) * s.fleet.telemetry_interval_s
            started = time.time()
            end = started + limits.baseline_max_s
            while time.time() < end:
                self._poll(0.5)
                self._sample()
                counts = [c for w in self.workers if w.status for c in w.status["baseline_inferences"]]
                if self.real is not None:
                    counts += [self.real.processed(d) for d in self.real.agents]
                enough = len(counts) == len(self.devices) and min(counts) >= need
                if enough and time.time() - started >= reports_s:
                    break
            else:
                self.notes.append(f"baseline: not every device reached {need} inferences in {limits.baseline_max_s}s")
        # Let the controller write what was sent (the gates read the database).
        deadline = time.time() + 30
        while time.time() < deadline and api.get("/api/v1/health").get("ingest_queue", 0) > 0:
            time.sleep(0.1)
        time.sleep(min(1.0, s.fleet.telemetry_interval_s))  # the last reports are in flight, not yet queued

    # ------------------------------------------------------------ rollout --

    def _create_rollout(self) -> None:
        s, api = self.scenario, self.api
        assert api is not None and s.rollout is not None and self.controller is not None
        body = dict(s.rollout)
        body["version"] = self.versions[(body["model"], _version_key(body.get("version", 1)))]
        body.setdefault("description", f"simulation {s.name}")
        self.cpu["controller_before"] = self.controller.cpu_s()
        self.cpu["broker_before"] = process_cpu_s(self.broker.pid if self.broker else None)
        self.t0 = time.time()
        created = api.post("/api/v1/rollouts", json=body)
        self.rollout_id = created["id"]
        self.rollout = created
        for w in self.workers:
            self._send(w, "rollout", self.t0)
        if self.options.on_rollout is not None:
            self.options.on_rollout(self)
        waves = ", ".join(f"{w['name'] or w['index']}: {w['devices']}" for w in created["waves"])
        self.console.log(f"rollout {self.rollout_id[:8]} of {body['model']} v{body['version']} created ({waves})")

    def _follow(self, until: float, rollout: bool) -> None:
        """Sample until the rollout ends (or ``until``)."""
        api = self.api
        assert api is not None
        next_sample = 0.0
        while time.time() < until:
            self._poll(0.1)
            if time.time() < next_sample:
                continue
            next_sample = time.time() + self.options.sample_every_s
            if rollout and self.rollout_id is not None:
                self.rollout = api.get(f"/api/v1/rollouts/{self.rollout_id}")
                for wave in self.rollout["waves"]:
                    if wave["deployment_id"]:
                        self._wave_of_dep[wave["deployment_id"]] = wave["index"]
            self._sample()
            if rollout and self.rollout is not None and self.rollout["state"] in END_STATES:
                self.ended_at = time.time()
                assert self.controller is not None
                self.cpu["controller_after"] = self.controller.cpu_s()
                self.cpu["broker_after"] = process_cpu_s(self.broker.pid if self.broker else None)
                self.console.log(f"rollout {self.rollout['state']}: {escape(self.rollout['reason'])}")
                return
        if rollout:
            self.notes.append(
                f"the rollout had not ended when the run's limit ({self.scenario.limits.max_run_s}s) came"
            )
            self.console.log("[yellow]run limit reached before the rollout ended[/yellow]")

    def _settle(self) -> None:
        """After the rollout: devices finish what they do and the controller learns the final truth."""
        end = time.time() + self.scenario.limits.settle_s
        next_check = 0.0
        while time.time() < end:
            self._poll(0.2)
            if time.time() < next_check:
                continue
            next_check = time.time() + 1.0
            self._sample()
            if self.rollout_id is not None and self.api is not None:
                self.rollout = self.api.get(f"/api/v1/rollouts/{self.rollout_id}")
            moving = [d for d, st in self.device_states().items() if st[0] in MOVING]
            if not moving and not self.disagreements():
                return
        self.notes.append(f"the fleet had not settled after {self.scenario.limits.settle_s:.0f}s")

    # ------------------------------------------------------------ workers --

    def _send(self, w: _WorkerHandle, kind: str, body: Any) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            w.conn.send((kind, body))

    def _poll(self, timeout: float) -> None:
        """Read what the workers sent; raise if one died."""
        from multiprocessing.connection import wait

        if self.real is not None:
            dead = self.real.dead()
            if dead:
                agent = self.real.agents[dead[0]]
                code = agent.proc.poll() if agent.proc else None
                raise SimulationError(f"real agent {dead[0]} exited (code {code}): {agent.log_tail()}")
        conns = [w.conn for w in self.workers if w.final is None]
        if not conns:
            time.sleep(timeout)
            return
        ready = wait(conns, timeout)
        for w in self.workers:
            if w.conn not in ready:
                continue
            try:
                while w.conn.poll():
                    kind, body = w.conn.recv()
                    self._on_worker(w, kind, body)
            except (EOFError, OSError):
                if w.final is None:
                    raise SimulationError(f"worker {w.index} died (exit code {w.process.exitcode})") from None

    def _on_worker(self, w: _WorkerHandle, kind: str, body: Any) -> None:
        if kind == "booted":
            w.booted = True
        elif kind in ("status", "final"):
            w.status = body
            self.fault_events.extend(body["fault_events"])
            for _, device, fault, detail in body["fault_events"][:20]:
                self.console.log(f"fault {fault} on {device} ({escape(str(detail))})", quiet=True)
            if kind == "final":
                w.final = body

    def _connected(self) -> int:
        return sum(1 for st in self.device_states().values() if st[5] == 1)

    def device_states(self) -> dict[str, tuple[str, float, int, str, str, int, str]]:
        """Device id -> (state, progress, active version, variant, deployment id, connected, model)."""
        out = {}
        for w in self.workers:
            if w.status is None:
                continue
            for spec, st in zip(w.devices, w.status["devices"], strict=True):
                out[spec.id] = (STATE_NAMES[st[0]], st[1], st[2], st[3], st[4], st[5], st[6])
        if self.real is not None:
            out.update(self._real_states())
        return out

    def _real_states(self) -> dict[str, tuple[str, float, int, str, str, int, str]]:
        """Real agents: the served model and the connection from their own health, the deployment state from
        the controller's targets (the newest deployment that names the device)."""
        assert self.real is not None
        latest: dict[str, tuple[str, dict[str, Any]]] = {}
        for dep_id, targets in self._targets.items():  # insertion order: older deployments first
            for device, target in targets.items():
                latest[device] = (dep_id, target)
        out = {}
        for device, agent in self.real.agents.items():
            health = self.real.health(device)
            model = (health or {}).get("model") or {}
            connected = 1 if health and health.get("broker_connected") else (0 if agent.alive() else -1)
            dep, target = latest.get(device, ("", {}))
            state = target.get("state") or ("active" if model else "idle")
            if state not in STATE_NAMES:
                state = "idle"
            progress = float(target.get("progress", 0.0)) if target else 0.0
            out[device] = (
                state,
                round(progress, 3),
                int(model.get("version") or 0),
                str(model.get("variant") or ""),
                dep,
                connected,
                str(model.get("model") or ""),
            )
        return out

    def _refresh_targets(self) -> None:
        """The controller's targets of the deployments real agents take part in (finished ones once more)."""
        if self.real is None or self.api is None:
            return
        deps = [self._install_dep] if self._install_dep else []
        deps += [w["deployment_id"] for w in (self.rollout or {}).get("waves", []) if w.get("deployment_id")]
        for dep_id in deps:
            if dep_id in self._finished_deps:
                continue
            body = self.api.get(f"/api/v1/deployments/{dep_id}")
            self._targets[dep_id] = {t["device_id"]: t for t in body["targets"] if t["device_id"] in self.real.agents}
            if body["status"] != "running":
                self._finished_deps.add(dep_id)

    def _real_faults(self) -> None:
        """The scenario's faults on real agents: power losses (SIGKILL, then a boot from the data directory),
        partitions of their link (``disconnect``) and the link's latency, loss and bandwidth cap, which their
        loopback proxies apply (the strongest of the faults active now, as on a virtual link)."""
        if self.real is None:
            return
        now = time.time()
        states = self._real_states()
        for device, agent in self.real.agents.items():
            link: dict[str, float] = {}
            for fault in agent.spec.faults:
                kind = fault["kind"]
                if kind in ("latency", "loss", "bandwidth"):
                    if self._fault_active(fault, now):
                        for key in ("latency_ms", "jitter_ms", "rate", "rto_ms", "bytes_per_s"):
                            if fault.get(key) is not None:
                                value = float(fault[key])
                                link[key] = min(link[key], value) if key == "bytes_per_s" and key in link else value
                    continue
                if kind not in ("power_loss", "disconnect"):
                    continue
                fired = self._real_fired[(device, fault["id"])]
                if fired >= int(fault.get("times", 1)) or agent.proc is None:
                    continue
                when = fault.get("when")
                if when is not None:
                    st = states[device]
                    due = st[0] == when["state"] and (when["state"] != "downloading" or st[1] >= when["progress"])
                elif fault.get("at_s") is not None:
                    at = float(fault["at_s"]) + fired * float(fault.get("repeat_every_s") or 0.0)
                    due = self.t0 is not None and now >= self.t0 + at
                else:
                    due = fired == 0
                if due:
                    self._real_fired[(device, fault["id"])] += 1
                    where = f" at {when['state']} {when['progress']:.0%}" if when else ""
                    detail = f"down {fault['duration_s']}s{where}"
                    if kind == "power_loss":
                        self.real.power_loss(device, float(fault["duration_s"]), detail)
                    else:
                        self.real.disconnect(device, float(fault["duration_s"]), detail)
            if self.real.links is not None and device in self.real.links.links:
                self.real.links.configure(
                    device,
                    latency_ms=link.get("latency_ms", 0.0),
                    jitter_ms=link.get("jitter_ms", 0.0),
                    loss=link.get("rate", 0.0),
                    rto_ms=link.get("rto_ms", 200.0),
                    bytes_per_s=link.get("bytes_per_s"),
                )

    def _fault_active(self, fault: dict[str, Any], now: float) -> bool:
        """Whether a link fault holds now: from ``at_s`` after the rollout's creation (unset: from the fleet's
        start) for ``duration_s`` (unset: to the end)."""
        if fault.get("at_s") is None:
            start = self.phases.get("fleet", now)
        elif self.t0 is None:
            return False
        else:
            start = self.t0 + float(fault["at_s"])
        return start <= now and (fault.get("duration_s") is None or now < start + float(fault["duration_s"]))

    def stats(self) -> dict[str, Any]:
        total: Counter[str] = Counter()
        faults: Counter[str] = Counter()
        for w in self.workers:
            if w.status is None:
                continue
            total.update(w.status["stats"])
            faults.update(w.status["fault_counts"])
        if self.real is not None:
            faults.update(self.real.fault_counts)
        return {"devices": dict(total), "faults": dict(faults)}

    # ----------------------------------------------------------- sampling --

    def _sample(self) -> None:
        if self.real is not None:
            self._refresh_targets()
            self._real_faults()
            self.fault_events.extend(self.real.take_fault_events())
        states = self.device_states()
        if not states:
            return
        now = time.time()
        for device, st in states.items():
            if st[4] in self._wave_of_dep:
                self.first_seen.setdefault((device, st[4]), {}).setdefault(st[0], now)
        waves: list[dict[str, Any]] = []
        rollout = self.rollout
        wave_sizes = [w["devices"] for w in rollout["waves"]] if rollout else []
        counts: list[Counter[str]] = [Counter() for _ in wave_sizes]
        progress: list[list[float]] = [[] for _ in wave_sizes]
        overall: Counter[str] = Counter()
        for state, prog, _version, _variant, dep, connected, _model in states.values():
            wave = self._wave_of_dep.get(dep)
            label = state if wave is not None else WAITING
            if connected != 1:
                overall[OFFLINE] += 1
            overall[label] += 1
            if wave is not None and wave < len(counts):
                counts[wave][state] += 1
                if state == "downloading":
                    progress[wave].append(prog)
        for i, size in enumerate(wave_sizes):
            touched = sum(counts[i].values())
            if size > touched:
                counts[i][WAITING] += size - touched
            waves.append(dict(counts[i]))
        stats = self.stats()
        sample = {
            "t": round(now - (self.t0 or now), 2),
            "at": now,
            "rollout": rollout["state"] if rollout else None,
            "wave": rollout["wave_index"] if rollout else None,
            "states": dict(overall),
            "waves": waves,
            "download": [round(sum(p) / len(p), 4) if p else None for p in progress],
            "downloading": [len(p) for p in progress],
            "mb_in": round(stats["devices"].get("bytes_in", 0) / 1e6, 3),
            "telemetry": stats["devices"].get("telemetry", 0),
            "gates": [
                {k: g.get(k) for k in ("name", "value", "threshold", "comparison", "status", "samples", "min_samples")}
                for g in (rollout["gates"] if rollout else [])
            ],
        }
        self.timeline.append(sample)
        self.console.update(self, sample)

    # ------------------------------------------------------------- checks --

    def disagreements(self) -> list[str]:
        """Devices whose active model in the controller differs from the device's own truth."""
        if self.api is None:
            return ["no controller"]
        truth = self.device_states()
        out = []
        for device in self.api.devices(q=f"{self.scenario.fleet.prefix}-"):
            if device["id"] not in truth:
                continue
            st = truth[device["id"]]
            active = next((m for m in device.get("installed") or [] if m.get("active", True)), None)
            mine = (st[6], st[2], st[3]) if st[2] else None
            theirs = (active["model"], int(active["version"]), active["variant"]) if active else None
            if mine != theirs:
                out.append(f"{device['id']}: device serves {mine}, controller says {theirs}")
        return out

    def _collect(self, error: str | None) -> None:
        """The controller's final view: failure reasons per device, and where it disagrees with the devices."""
        self.final_reasons: dict[str, int] = {}
        self.final_disagreements: list[str] | None = None
        samples = self._metrics()
        self.telemetry_ingested = samples.get(INGESTED)
        # by kind: one broadcast frame reaches every subscriber, a repair frame one device
        self.chunks_published = {
            kind: int(samples.get(f'slmfleet_chunks_published_total{{kind="{kind}"}}', 0))
            for kind in ("broadcast", "repair")
        }
        self.final_wave_targets: dict[int, list[dict[str, Any]]] = {}
        if self.api is None or error is not None:
            return
        try:
            if self.rollout_id is not None:
                self.rollout = self.api.get(f"/api/v1/rollouts/{self.rollout_id}")
                for wave in self.rollout.get("waves", []):
                    if wave.get("deployment_id"):
                        dep = self.api.get(f"/api/v1/deployments/{wave['deployment_id']}")
                        self.final_wave_targets[wave["index"]] = dep["targets"]
            self.final_reasons = self._failure_reasons()
            self.final_disagreements = self.disagreements()
        except SimulationError as exc:
            self.notes.append(f"could not read the controller's final view: {exc}")

    def _telemetry_ingested(self) -> float | None:
        """Telemetry messages the controller stored (its Prometheus counter), or None."""
        return self._metrics().get(INGESTED)

    def _metrics(self) -> dict[str, float]:
        """The controller's Prometheus samples (name with labels -> value); empty when unreadable."""
        if self.api is None:
            return {}
        for path in ("/api/v1/metrics", "/metrics"):
            try:
                r = self.api.client.get(path, timeout=10)
            except httpx.HTTPError:
                return {}
            if r.status_code != 200:
                continue
            out = {}
            for line in r.text.splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    with contextlib.suppress(ValueError):
                        out[name] = float(value)
            return out
        return {}

    def _drain_telemetry(self, quiet_s: float = 3.0, limit_s: float = 60.0) -> float | None:
        """Once the fleet stopped: what the controller stored in the end. Waits (bounded) until its count
        reaches what the devices sent or stops growing, so lag is not mistaken for loss."""
        sent = self.stats()["devices"].get("telemetry", 0)
        last = self._telemetry_ingested()
        if last is None:
            return None
        changed = time.monotonic()
        deadline = changed + limit_s
        while last < sent and time.monotonic() < deadline and time.monotonic() - changed < quiet_s:
            time.sleep(0.5)  # polling a counter of another process, with a deadline
            now = self._telemetry_ingested()
            if now is None:
                break
            if now != last:
                last, changed = now, time.monotonic()
        return last

    # ------------------------------------------------------------ teardown --

    def _teardown(self) -> None:
        if self.real is not None:
            self.real.stop()
        for w in self.workers:
            self._send(w, "stop", None)
        deadline = time.time() + 30
        while time.time() < deadline and any(w.final is None and w.process.is_alive() for w in self.workers):
            try:
                self._poll(0.2)
            except SimulationError:
                break
        for w in self.workers:
            w.process.join(5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)
        self.telemetry_drained = self._drain_telemetry()
        if self.controller is not None:
            if "controller_after" not in self.cpu:
                self.cpu["controller_after"] = self.controller.cpu_s()
            self.cpu["controller_total"] = self.controller.cpu_s()
            self.controller.stop()
        if self.broker is not None:
            self.cpu["broker_total"] = process_cpu_s(self.broker.pid)
            self.broker.stop()

    # ------------------------------------------------------------- report --

    def _final_devices(self) -> dict[str, Any]:
        states = self.device_states()
        by_profile: dict[str, Counter[str]] = {}
        by_state: Counter[str] = Counter()
        for spec in self.devices:
            st = states.get(spec.id)
            if st is None:
                continue
            by_state[st[0]] += 1
            key = f"{st[6]} v{st[2]} {st[3]}" if st[2] else "no model"
            by_profile.setdefault(spec.profile, Counter())[key] += 1
        return {
            "by_state": dict(by_state),
            "by_profile": {p: dict(c) for p, c in by_profile.items()},
            "states": {d: list(st) for d, st in states.items()},
        }

    def _failure_reasons(self) -> dict[str, int]:
        reasons: Counter[str] = Counter()
        if self.api is None or self.rollout is None:
            return {}
        for wave in self.rollout.get("waves", []):
            if not wave.get("deployment_id"):
                continue
            try:
                dep = self.api.get(f"/api/v1/deployments/{wave['deployment_id']}")
            except SimulationError:
                continue
            for t in dep["targets"]:
                if t["state"] in ("failed", "rolled_back", "cancelled") and t["reason"]:
                    reasons[f"{t['state']}: {t['reason'][:300]}"] += 1
                elif t["state"] != "active" and self.rollout.get("state") not in END_STATES:
                    # the run ended with the rollout still going: say where its devices are stuck
                    reasons[f"still {t['state']}: {(t.get('reason') or '')[:200]} ({t['device_id']})"] += 1
        return dict(reasons.most_common(20))

    def _report(self, started: float, error: str | None) -> dict[str, Any]:
        s = self.scenario
        ended = self.ended_at
        phases = dict(sorted(self.phases.items(), key=lambda kv: kv[1]))
        names = list(phases)
        durations = {
            name: round((phases[names[i + 1]] if i + 1 < len(names) else time.time()) - phases[name], 2)
            for i, name in enumerate(names)
        }
        cpu = self.cpu
        during = None
        if cpu.get("controller_before") is not None and cpu.get("controller_after") is not None:
            during = round(cpu["controller_after"] - cpu["controller_before"], 2)  # type: ignore[operator]
        broker_during = None
        if cpu.get("broker_before") is not None and cpu.get("broker_after") is not None:
            broker_during = round(cpu["broker_after"] - cpu["broker_before"], 2)  # type: ignore[operator]
        if self.t0 is not None:  # samples taken before the rollout existed count back from its creation
            for sample in self.timeline:
                sample["t"] = round(sample["at"] - self.t0, 2)
        worker_status = [w.final or w.status for w in self.workers]
        report: dict[str, Any] = {
            "scenario": {
                "name": s.name,
                "description": s.description,
                "seed": s.seed,
                "devices": len(self.devices) or s.fleet.devices,
                "profiles": [p.model_dump(mode="json") for p in s.fleet.profiles],
                "faults": [f.model_dump(mode="json") for f in s.faults],
                "rollout": s.rollout,
            },
            "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
            "error": error,
            "notes": self.notes,
            "phases_s": durations,
            "rollout_duration_s": round(ended - self.t0, 2) if ended and self.t0 else None,
            "infrastructure": {
                "broker": self.broker.url if self.broker else None,
                "broker_engine": self.broker.engine if self.broker else None,
                "controller": self.controller.url if self.controller else None,
                "worker_processes": len(self.workers),
            },
            "models": {
                f"{m}@{k}": {
                    "number": n,
                    "variants": {v: info for (mm, kk, v), info in self.variants.items() if (mm, kk) == (m, k)},
                }
                for (m, k), n in self.versions.items()
            },
            "rollout": self.rollout,
            "timeline": self.timeline,
            "faults": {
                "counts": self.stats()["faults"] if (self.workers or self.real) else {},
                "events": [list(e) for e in self.fault_events[:1000]],
            },
            "fleet": self.stats()["devices"] if (self.workers or self.real) else {},
            "devices": self._final_devices() if (self.workers or self.real) else {},
            "failure_reasons": getattr(self, "final_reasons", {}),
            "controller_disagreements": (getattr(self, "final_disagreements", None) or [])[:50],
            "resources": {
                "controller_cpu_s_during_rollout": during,
                "controller_cpu_s_total": cpu.get("controller_total"),
                "broker_cpu_s_during_rollout": broker_during,
                "broker_cpu_s_total": cpu.get("broker_total"),
                "controller_telemetry_ingested": getattr(self, "telemetry_ingested", None),
                "controller_telemetry_stored_after_drain": getattr(self, "telemetry_drained", None),
                "controller_chunks_published": getattr(self, "chunks_published", None),
                "worker_cpu_s": [ws["cpu_s"] for ws in worker_status if ws],
                "worker_max_rss_mb": [round(ws["rss_bytes"] / 2**20, 1) for ws in worker_status if ws],
                "chunk_hash_hits": sum(ws["hash_hits"] for ws in worker_status if ws),
                "chunk_hash_misses": sum(ws["hash_misses"] for ws in worker_status if ws),
            },
        }
        if self.real is not None:
            report["resources"]["real_agents_telemetry_stored"] = self._real_telemetry_rows()
        report["wave_durations_s"] = wave_durations(self.rollout)
        report["calibration"] = self._calibration_report()
        if self.real is not None or s.fleet.real_agents:
            report["populations"] = self._populations()
        assertions = evaluate(
            s, report, self.devices, versions=self.versions, disagreements=getattr(self, "final_disagreements", None)
        )
        if error:
            assertions.insert(0, {"name": "run", "expected": "the scenario runs", "actual": error, "ok": False})
        report["assertions"] = assertions
        report["ok"] = all(a["ok"] for a in assertions)
        return report

    def _db_url(self) -> str | None:
        """The started controller's SQLite database (the populations' gates and the recorded profile read it)."""
        s = self.scenario
        if s.controller.url is not None or self._tmp is None or "database_url" in s.controller.settings:
            return None
        path = self._tmp / "controller" / "controller.db"
        return f"sqlite:///{path.resolve()}" if path.is_file() else None

    def _real_telemetry_rows(self) -> int | None:
        """Telemetry rows the controller stored from the real agents (their sends are not counted device-side)."""
        db = self._db_url()
        if db is None or self.real is None:
            return None
        from sqlalchemy import create_engine, func, select

        from controller.db.models import TelemetryRecord, table

        t = table(TelemetryRecord)
        engine = create_engine(db)
        try:
            with engine.connect() as conn:
                query = select(func.count()).select_from(t).where(t.c.device_id.in_(sorted(self.real.agents)))
                return int(conn.execute(query).scalar_one())
        except Exception as exc:  # the report says so instead of failing
            self.notes.append(f"could not count the real agents' telemetry: {exc}")
            return None
        finally:
            engine.dispose()

    def _populations(self) -> dict[str, Any]:
        """Real agents and virtual devices side by side (``simulations.populations``)."""
        from simulations.populations import latency_stalls, population_gates, wave_times

        final = self._final_devices() if (self.workers or self.real) else {"states": {}}
        wave_dep = {w: d for d, w in self._wave_of_dep.items()}
        deps = set(wave_dep.values())
        activated_at = {
            d: seen["active"] for (d, dep), seen in self.first_seen.items() if dep in deps and "active" in seen
        }
        rollout = self.scenario.rollout or {}
        model = rollout.get("model")
        version = self.versions.get((model, _version_key(rollout.get("version", 1)))) if model else None
        out: dict[str, Any] = {}
        for name, members in (
            ("real", [d for d in self.devices if d.real_agent]),
            ("virtual", [d for d in self.devices if not d.real_agent]),
        ):
            ids = {d.id for d in members}
            by_state: Counter[str] = Counter()
            by_model: Counter[str] = Counter()
            for device in ids:
                st = final["states"].get(device)
                if st is None:
                    continue
                by_state[st[0]] += 1
                by_model[f"{st[6]} v{st[2]} {st[3]}" if st[2] else "no model"] += 1
            try:
                gates = population_gates(
                    self._db_url(),
                    self.scenario.rollout,
                    model,
                    version,
                    self.final_wave_targets_or_empty(),
                    ids,
                    activated_at,
                )
            except Exception as exc:  # the report still shows the rest
                gates = []
                self.notes.append(f"population gates ({name}) could not be computed: {exc}")
            db = self._db_url()
            try:
                stalls = latency_stalls(db, ids) if ids and db else {"reports": 0}
            except Exception as exc:  # the report still shows the rest
                stalls = {}
                self.notes.append(f"latency stalls ({name}) could not be computed: {exc}")
            out[name] = {
                "devices": len(ids),
                "latency_stalls": stalls,
                "profiles": dict(Counter(d.profile for d in members)),
                "waves": wave_times(
                    ids, self.final_wave_targets_or_empty(), self.first_seen, wave_dep, wave_starts(self.rollout)
                ),
                "gates": gates,
                "final_states": dict(by_state),
                "final_models": dict(by_model),
            }
        out["real"]["specs"] = [
            {"id": d.id, "profile": d.profile, "arch": d.arch, "ram_bytes": d.ram_bytes}
            for d in self.devices
            if d.real_agent
        ]
        if self.real is not None:
            out["real"]["restarts"] = sum(a.restarts for a in self.real.agents.values())
            out["real"]["inputs_dropped"] = sum(a.dropped for a in self.real.agents.values())
        out["faults_not_applied"] = self._faults_not_applied()
        return out

    def _record_profile(self, report: dict[str, Any]) -> None:
        """The real agents' measurements per variant, written for ``calibration.profile`` (and the report)."""
        from simulations.populations import measured_profile, write_profile

        path = self.options.record_profile
        assert path is not None
        db = self._db_url()
        if self.real is None or db is None:
            self.notes.append(f"no profile recorded to {path}: it needs real agents and a started controller")
            return
        keys = {(m, n): k for (m, k), n in self.versions.items()}
        rates: dict[tuple[str, str, str], list[float]] = {}
        wave_dep = {w: d for d, w in self._wave_of_dep.items()}
        rollout = self.scenario.rollout or {}
        key = _version_key(rollout.get("version", 1)) if rollout else ""
        for wave, targets in self.final_wave_targets_or_empty().items():
            for t in targets:
                if t["device_id"] not in self.real.agents or not t.get("variant"):
                    continue
                seen = self.first_seen.get((t["device_id"], wave_dep.get(wave, "")), {})
                past = [v for st, v in seen.items() if st in ("verifying", "staged", "shadow", "activating", "active")]
                info = self.variants.get((rollout["model"], key, t["variant"]))
                if "downloading" in seen and past and info and min(past) > seen["downloading"]:
                    rates.setdefault((rollout["model"], key, t["variant"]), []).append(
                        info["size_bytes"] / (min(past) - seen["downloading"])
                    )
        entries = measured_profile(db, set(self.real.agents), keys, rates)
        write_profile(
            path,
            entries,
            {
                "scenario": self.scenario.name,
                "real_agents": len(self.real.agents),
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "note": "latency and RSS on this machine (cpu_speed 1.0); download rate over the loopback broker",
            },
        )
        report["recorded_profile"] = {"path": str(path), "variants": entries}
        self.console.log(f"recorded profile of {len(entries)} variants to {path}")

    def final_wave_targets_or_empty(self) -> dict[int, list[dict[str, Any]]]:
        return getattr(self, "final_wave_targets", {})

    def _faults_not_applied(self) -> list[dict[str, Any]]:
        """The scenario's faults that selected real agents and could not be applied to them, and why."""
        from simulations.device.agents import APPLIED_FAULTS, NOT_APPLIED

        counts: dict[tuple[int, str], int] = {}
        for d in self.devices:
            if not d.real_agent:
                continue
            for fault in d.faults:
                if fault["kind"] not in APPLIED_FAULTS:
                    counts[(fault["id"], fault["kind"])] = counts.get((fault["id"], fault["kind"]), 0) + 1
        return [
            {"fault": i, "kind": kind, "real_agents": n, "why": NOT_APPLIED.get(kind, "not modelled for real agents")}
            for (i, kind), n in sorted(counts.items())
        ]

    def _calibration_report(self) -> dict[str, Any]:
        """Which of the virtual devices' numbers were measured and which assumed, and the values used."""
        cal = self.scenario.calibration
        return {
            "latency": cal.latency,
            "memory": cal.memory,
            "download": cal.download,
            "profile": str(cal.profile) if cal.profile else None,
            "reference_cpu": "this machine (cpu_speed 1.0): the registry measures here, real agents run here",
            "link_bytes_per_s": getattr(self, "link_bytes_per_s", None),
            "variants": {
                f"{m}@{k}/{v}": {
                    "latency_ms_p50": info.get("latency_ms_p50"),
                    "latency_ms_p95": info.get("latency_ms_p95"),
                    "peak_rss_bytes": info.get("peak_rss_bytes"),
                    "used_latency_ms": self._used_latency.get((m, k, v)),
                    "used_download_bytes_per_s": self._used_download.get((m, k, v)),
                }
                for (m, k, v), info in self.variants.items()
            },
        }

    def _write(self, report: dict[str, Any]) -> RunResult:
        from simulations.report import render_html

        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / "report.json"
        json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        html_path = out / "report.html"
        html_path.write_text(render_html(report))
        failures = [
            f"{a['name']}: expected {a['expected']}, got {a['actual']}" for a in report["assertions"] if not a["ok"]
        ]
        self.console.summary(report, json_path, html_path)
        return RunResult(report["ok"], report, out, json_path, html_path, failures)


def run_scenario(scenario: Scenario, options: RunOptions | None = None) -> RunResult:
    """Run ``scenario``; the result says whether its expectations held and where the report is."""
    return Runner(scenario, options).run()

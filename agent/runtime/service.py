"""The agent process: the sans-IO core driven over a real MQTT connection, and inference as a service.

Threads: the asyncio loop owns the MQTT connection(s), the core, the spool and the local HTTP
endpoint; one thread per JSON-lines input (file, stdin) reads it; one thread runs the model. They
meet at the engine's bounded queue (``agent.inference.engine``) and at thread-safe counters.

What serves is whatever ``ModelHost`` holds: ``--model`` at start, later the deployment driver's
switches (see the DeploymentDriver hook below). Every batch pins its pipeline, so a switch is atomic
and never loses a request that is queued or running.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.core import AgentCore, CoreAction, CoreConfig, Reconnect, TelemetrySample
from agent.core.guard import CommandGuard
from agent.core.outbox import Outbox
from agent.core.shell import CoreShell
from agent.deploy.config import DeployConfig
from agent.deploy.driver import DeploymentDriver
from agent.inference.bundle import ModelSource, resolve_model
from agent.inference.engine import InferenceEngine
from agent.inference.host import Loaded, ModelHost
from agent.inference.http import HttpFrontend
from agent.inference.inputs import JsonLinesInput, PayloadFormat
from agent.inference.loader import MIB, ModelLoader
from agent.inference.session import InputError, ModelLoadError, configure_sessions
from agent.inference.sinks import FileSink, MqttSink
from agent.runtime.config import AgentSettings, ConfigError
from agent.runtime.nonces import DiskNonceStore
from agent.runtime.notify import Notifier
from agent.telemetry.spool import SqliteSpool
from agent.telemetry.stats import InferenceCounters
from agent.telemetry.system import (
    CpuMeter,
    hardware_profile,
    release_file_pages,
    rss_bytes,
    temperature_c,
    trim_heap,
    tune_heap,
)
from agent.transport.mqtt import MqttConfig, MqttTransport, parse_broker_url

if TYPE_CHECKING:
    from agent.runtime.identity import ClientIdentity
from wire import codec, topics
from wire.manifest import Task
from wire.messages import InstalledModel

log = logging.getLogger(__name__)


def capabilities(settings: AgentSettings) -> list[str]:
    """What this agent can do, for the birth message: tasks, runtimes, input kinds."""
    caps = [f"task:{t.value}" for t in Task] + ["runtime:onnxruntime"]
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        caps.append("runtime:onnxruntime-genai")
    caps += ["input:file", "input:stdin", "input:mqtt", "input:http"]
    return caps


class AgentService:
    """One device agent. ``await run()`` until SIGTERM/SIGINT or ``request_stop()``."""

    def __init__(self, settings: AgentSettings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.counters = InferenceCounters()
        configure_sessions(allow_spinning=settings.ort_allow_spinning)
        tune_heap()  # chunk-sized buffers reused, not mapped and faulted in again per frame
        self.host = ModelHost(threads=settings.threads)
        self.loader = ModelLoader(self.host, settings.model_max_rss_mib * MIB)
        self._cpu = CpuMeter()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.engine: InferenceEngine | None = None
        self.http: HttpFrontend | None = None
        self.inputs: list[JsonLinesInput] = []
        self.transport: MqttTransport | None = None
        self.input_transport: MqttTransport | None = None
        self.core: AgentCore | None = None
        self.outbox: Outbox | None = None
        #: carries out the core's actions over ``transport`` and ``outbox`` (built with the outbox in ``run``)
        self.shell: CoreShell | None = None
        self.results_mqtt: MqttSink | None = None
        self.active_source: ModelSource | None = None
        self._input_format = PayloadFormat(
            settings.mqtt_input_format, settings.mqtt_input_path, settings.mqtt_input_key, settings.mqtt_input_id_path
        )
        self._input_drops = codec.DropCounter(log)
        #: The deployment state machine (agent/deploy), built in ``_make_deployment_driver``.
        self.deployment: DeploymentDriver | None = None
        #: the client certificate for a broker that requires one (renewed before it expires)
        self.identity: ClientIdentity | None = None
        self.ready = threading.Event()
        self.exit_code = 0

    # --------------------------------------------------------------- run --

    async def run(self) -> int:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        s.data_dir.mkdir(parents=True, exist_ok=True)
        spool = SqliteSpool(s.data_dir / "spool.sqlite3", s.spool_max_messages, s.spool_max_bytes)
        self.outbox = Outbox(spool)
        self.shell = CoreShell(self.outbox, lambda: self.transport, reconnect=self._reconnect)
        sinks: list[Any] = []
        if s.results is not None:
            sinks.append(FileSink(s.results))
        self.engine = InferenceEngine(
            self.host,
            self.counters,
            max_batch=s.max_batch,
            max_wait_ms=s.max_wait_ms,
            queue_size=s.queue_size,
            sinks=sinks,
            include_input=s.results_include_input,
        )

        # Deployments (agent/deploy): built after the engine and before the core, which routes commands,
        # chunk frames and reconnects to it; it switches models on self.host atomically.
        deployment = self.deployment = self._make_deployment_driver()
        self.engine.taps.append(deployment.shadow.offer)

        files = s.client_cert_files()
        if files is not None:
            # Only here: cryptography's x509 costs ~2 MiB of RSS an agent without client certificates never needs.
            from agent.runtime.identity import ClientIdentity

            self.identity = ClientIdentity(s.device_id, files[0], files[1], s.data_dir / "tls")
        now = time.time()
        self.core = AgentCore(
            CoreConfig(
                device_id=s.device_id,
                agent_version=__version__,
                keepalive_s=s.keepalive_s,
                telemetry_interval_s=s.telemetry_interval_s,
                labels=dict(s.labels),
                capabilities=capabilities(s),
            ),
            hardware_profile(s.data_dir).model_copy(update=s.report_hardware),
            self._sample,
            started_at=now,
            installed=self._installed,
            deployments=self.deployment,
            # the key that signs manifests also signs commands, each for this device alone
            guard=CommandGuard(s.device_id, deployment.manager.key, DiskNonceStore(s.data_dir)),
            certificates=self.identity,
        )

        transport = self.transport = MqttTransport(
            self._mqtt_config(s.broker, s.mqtt_username, s.mqtt_password()),
            s.device_id,
            will=self.core.will(now),
            name=s.device_id,
            on_connect=self._on_connect,
            on_message=self._on_message,
            on_published=self._on_published,
            on_refused=self._on_refused,
        )
        if s.results_mqtt:
            self.results_mqtt = MqttSink(s.device_id, transport.publish, self._loop, s.results_sample)
            self.engine.sinks.append(self.results_mqtt)

        self._install_signals()
        self._execute([self.core.event("started", f"agent {__version__} started", now)])
        self._execute(deployment.start(now))  # resume a persisted deployment, serve the active slot
        transport.start()
        self.engine.start()
        ticker = asyncio.create_task(self._tick_forever())
        try:
            await self._load_initial_model()
            await self._start_inputs()
            release_file_pages()  # what starting mapped of its libraries and will not run again
            self.ready.set()
            self.notifier.ready(f"device {s.device_id}: {self._serving_status()}")
            await self._stop.wait()
        except ConfigError as exc:
            log.error("%s", exc)
            self.exit_code = 2
        finally:
            ticker.cancel()
            await self._shutdown()
            spool.close()
        return self.exit_code

    def request_stop(self) -> None:
        """Ask the agent to stop (thread-safe)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    # ---------------------------------------------------------- wiring --

    def _make_deployment_driver(self) -> DeploymentDriver:
        """The deployment state machine over two slots in ``data_dir/deploy`` (resumed on start)."""
        s = self.settings
        assert self._loop is not None
        return DeploymentDriver.open(
            s.device_id,
            s.data_dir,
            self.host,
            s.pinned_key_file(),
            post=self._loop.call_soon_threadsafe,
            emit=self._execute,
            config=DeployConfig(store_max_bytes=s.store_max_bytes),
            static_model=self.load_configured_model,
            loader=self.loader,
        )

    def _mqtt_config(self, url: str, username: str | None, password: str | None) -> MqttConfig:
        s = self.settings
        fields = parse_broker_url(url)
        if username:
            fields["username"] = username
        if password:
            fields["password"] = password
        if s.ca_file and fields.get("tls"):
            fields["ca_file"] = str(s.ca_file)
        if self.identity is not None and fields.get("tls") and url == s.broker:
            cert, key = self.identity.files()
            fields["cert_file"], fields["key_file"] = str(cert), str(key)
        return MqttConfig(
            **fields,
            keepalive_s=s.keepalive_s,
            protocol=s.mqtt_protocol,
            reconnect_max_s=s.reconnect_max_s,
            refused_retry_s=s.broker_refused_retry_s,
        )

    def _install_signals(self) -> None:
        assert self._loop is not None
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self._loop.add_signal_handler(sig, self.request_stop)

    def load_configured_model(self) -> Loaded | None:
        """Load ``--model`` (not serving it yet) under the memory ceiling; None when there is none or it fails."""
        path = self.settings.model
        if path is None:
            return None
        try:
            return self.loader.load(resolve_model(path))
        except ModelLoadError as exc:
            log.error("%s", exc)
            return None

    async def _load_initial_model(self) -> None:
        """Serve ``--model`` (in a thread: the loop keeps the broker connection and the watchdog alive)."""
        path = self.settings.model
        if path is None:
            return
        if self.deployment is not None and self.deployment.has_active_model():
            log.info("serving the deployed model in the active slot, not %s", path)
            return
        try:
            source = resolve_model(path)
            loaded = await asyncio.to_thread(self.loader.load, source)
        except ModelLoadError as exc:
            log.error("%s", exc)
            assert self.core is not None
            self._execute([self.core.event("error", str(exc), time.time())])
            return
        self.activate(loaded, source)

    def activate(self, loaded: Loaded, source: ModelSource | None = None) -> None:
        """Serve ``loaded`` from the next batch on (atomic; the previous pipeline closes once idle)."""
        self.host.switch(loaded)
        self.active_source = source
        assert self.core is not None
        report = self.loader.last_report
        memory = f", {report.measured_bytes / MIB:.0f} MiB" if report is not None else ""
        what = source.describe() if source is not None else str(loaded.bundle_dir)
        now = time.time()
        actions: list[CoreAction] = [self.core.event("model_loaded", f"serving {what}{memory}", now)]
        if self.transport is not None and self.transport.connected:
            actions.append(self.core.birth(now))  # the installed models changed
        self._execute(actions)

    def _installed(self) -> list[InstalledModel]:
        loaded = self.host.current()
        if loaded is None or loaded.ref is None:
            return []
        ref = loaded.ref
        return [
            InstalledModel(
                model=ref.model, version=ref.version, variant=ref.variant, artifact=loaded.artifact_id, active=True
            )
        ]

    def _serving_status(self) -> str:
        loaded = self.host.current()
        if loaded is None:
            return "no model"
        return f"serving {self.active_source.describe() if self.active_source else loaded.bundle_dir}"

    async def _start_inputs(self) -> None:
        s = self.settings
        assert self.engine is not None and self._loop is not None
        if s.http_port is not None:
            self.http = HttpFrontend(
                self.engine,
                host=s.http_host,
                port=s.http_port,
                max_body_bytes=s.http_max_body_bytes,
                health=self.health,
            )
            try:
                await self.http.start()
            except OSError as exc:
                self.http = None
                raise ConfigError(f"cannot serve HTTP on {s.http_host}:{s.http_port}: {exc}") from None
        if s.mqtt_input_topics:
            if s.mqtt_input_broker is None:
                assert self.transport is not None
                for filter_ in s.mqtt_input_topics:
                    self.transport.subscribe(filter_, s.mqtt_input_qos)
            else:
                transport = self.input_transport = MqttTransport(
                    self._mqtt_config(s.mqtt_input_broker, s.mqtt_input_username, s.mqtt_input_password()),
                    f"{s.device_id}-input",
                    name=f"{s.device_id} inputs",
                    on_message=self._on_input_message,
                )
                for filter_ in s.mqtt_input_topics:
                    transport.subscribe(filter_, s.mqtt_input_qos)
                transport.start()
            log.info("inference inputs from MQTT topics %s", ", ".join(s.mqtt_input_topics))
        for path in s.input:
            reader = JsonLinesInput(path, self.engine, on_done=self._input_done)
            self.inputs.append(reader)
            reader.start()

    def _input_done(self, source: str, records: int, bad_lines: int) -> None:
        """A finite input ended (in its reader thread): tell the controller, durably."""
        loop, core = self._loop, self.core
        if loop is None or core is None:
            return
        message = f"{source}: {records} records read, {bad_lines} lines not JSON"
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(lambda: self._execute([core.event("input_done", message, time.time())]))

    def health(self) -> dict[str, Any]:
        """What ``GET /v1/health`` answers."""
        loaded = self.host.current()
        engine = self.engine
        return {
            "status": "ok" if engine is not None and engine.alive else "failing",
            "device_id": self.settings.device_id,
            "agent_version": __version__,
            "serving": loaded is not None,
            "model": loaded.ref.model_dump() if loaded is not None and loaded.ref is not None else None,
            "task": str(loaded.spec.task.value) if loaded is not None and loaded.spec.task is not None else None,
            "queue_depth": engine.depth if engine is not None else 0,
            "processed": engine.processed if engine is not None else 0,
            "errors": self.counters.total_errors,
            "drops": self.counters.total_drops,
            "broker_connected": bool(self.transport is not None and self.transport.connected),
            "rss_bytes": rss_bytes(),
        }

    def _sample(self, interval_s: float) -> TelemetrySample:
        assert self.outbox is not None
        loaded = self.host.current()
        depth = self.engine.depth if self.engine is not None else 0
        trim_heap()  # each interval, so RSS shows what is in use rather than what malloc keeps
        return TelemetrySample(
            cpu_percent=self._cpu.percent(),
            rss_bytes=rss_bytes(),
            temperature_c=temperature_c(),
            model=loaded.ref if loaded is not None else None,
            inference=self.counters.snapshot(interval_s, queue_depth=depth),
            spool_depth=len(self.outbox.spool),
            spool_dropped=self.outbox.spool.dropped,
            serving_s=time.time() - loaded.serving_since if loaded and loaded.serving_since else None,
            model_rss_bytes=loaded.rss_bytes or None if loaded is not None else None,
        )

    # ------------------------------------------------------------ core --

    def _execute(self, actions: list[CoreAction], pump: bool = True) -> None:
        assert self.shell is not None
        self.shell.execute(actions, pump)

    def _pump(self) -> None:
        assert self.shell is not None
        self.shell.pump()

    def _reconnect(self, action: Reconnect) -> None:
        assert self.transport is not None
        s = self.settings
        log.info("%s: reconnecting to the broker", action.reason)
        self.transport.reconnect(self._mqtt_config(s.broker, s.mqtt_username, s.mqtt_password()))

    def _on_connect(self) -> None:
        assert self.core is not None and self._loop is not None and self.transport is not None
        log.info(
            "connected to broker %s as %s (MQTT %s)",
            self.transport.server_url,
            self.settings.device_id,
            self.transport.protocol,
        )
        self._execute(self.core.on_connected(time.time()), pump=False)
        # paho calls this before it re-sends the messages that were in flight when the link dropped;
        # pumping the spool only after that keeps everything in the order it was produced.
        self._loop.call_soon(self._pump)
        self.notifier.status(f"device {self.settings.device_id}: connected, {self._serving_status()}")

    def _on_message(self, topic: str, payload: bytes) -> None:
        assert self.core is not None
        if self._is_input_topic(topic):
            self._on_input_message(topic, payload)
            return
        self._execute(self.core.on_message(topic, payload, time.time()))

    def _is_input_topic(self, topic: str) -> bool:
        """An input topic carried by the fleet connection (never this device's command topic)."""
        s = self.settings
        if not s.mqtt_input_topics or s.mqtt_input_broker is not None or topic == topics.cmd(s.device_id):
            return False
        return any(topics.matches(f, topic) for f in s.mqtt_input_topics)

    def _on_input_message(self, topic: str, payload: bytes) -> None:
        """A message on an input topic: one record for the engine (a full queue drops it, counted)."""
        assert self.engine is not None
        try:
            record = self._input_format.record(payload)
        except InputError as exc:
            self.counters.record_error()
            self._input_drops.drop(topic, "input", "bad_payload", str(exc))
            return
        self.engine.submit(record, f"mqtt:{topic}")

    def _on_published(self, mid: int) -> None:
        assert self.shell is not None
        self.shell.acked(mid)

    def _on_refused(self, reason: str) -> None:
        retry = self.settings.broker_refused_retry_s
        if retry <= 0:
            log.error("giving up: %s", reason)
            self.exit_code = 3
            self.request_stop()
            return
        # A revoked device, or a broker whose auth is broken for a while: local applications keep their
        # inference, telemetry keeps spooling, and the next try may get in (exiting would only have systemd
        # restart the agent into the same refusal until it stops trying for good).
        log.error("%s: serving local inputs, trying the broker again every %.0f s", reason, retry)
        self.notifier.status(f"device {self.settings.device_id}: {reason}; {self._serving_status()}")

    def _healthy(self) -> bool:
        """What the systemd watchdog vouches for: the loop runs (we are in it) and so does the model thread."""
        return self.engine is None or self.engine.failed is None

    async def _tick_forever(self) -> None:
        assert self.core is not None
        next_watchdog = 0.0
        while True:
            now = time.time()
            actions = self.core.tick(now)
            if actions:
                self._execute(actions)
            interval = self.notifier.watchdog_interval_s
            if interval is not None and time.monotonic() >= next_watchdog:
                if self._healthy():
                    self.notifier.watchdog()
                else:
                    log.critical("the inference thread is dead; not feeding the watchdog")
                next_watchdog = time.monotonic() + interval
            wait = max(0.01, min(self.core.next_wakeup() - time.time(), 1.0, interval or 1.0))
            await asyncio.sleep(wait)

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        for reader in self.inputs:
            reader.stop()
        if self.http is not None:
            await self.http.close()
        if self.input_transport is not None:
            await self.input_transport.stop()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        if self.deployment is not None:
            await asyncio.to_thread(self.deployment.close)  # lets a running switch finish
        transport = self.transport
        if transport is not None and self.core is not None:
            goodbye = self.core.goodbye(time.time())
            await transport.stop(final=(goodbye.topic, goodbye.payload, goodbye.qos, goodbye.retain))
        self.host.switch(None)


def run_agent(settings: AgentSettings) -> int:
    """Run an agent in this process until it is told to stop; returns the exit code."""
    service = AgentService(settings)
    return asyncio.run(service.run())

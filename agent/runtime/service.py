"""The agent process: the sans-IO core driven over a real MQTT connection.

Threads: the asyncio loop owns the MQTT connection, the core and the spool;
one thread reads the input stream; one runs the model. They meet at the
inference queue and at thread-safe counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from typing import IO

from agent import __version__
from agent.core import Action, AgentCore, CoreConfig, Publish, Subscribe, TelemetrySample
from agent.core.outbox import Outbox
from agent.inference.session import ModelLoadError, TensorModel
from agent.inference.worker import InferenceWorker, read_json_lines
from agent.runtime.config import AgentSettings
from agent.runtime.notify import Notifier
from agent.telemetry.spool import SqliteSpool
from agent.telemetry.stats import InferenceCounters
from agent.telemetry.system import CpuMeter, hardware_profile, rss_bytes, temperature_c
from agent.transport.mqtt import MqttConfig, MqttTransport, parse_broker_url

log = logging.getLogger(__name__)


class AgentService:
    """One device agent. ``await run()`` until SIGTERM/SIGINT or ``request_stop()``."""

    def __init__(self, settings: AgentSettings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.counters = InferenceCounters()
        self._cpu = CpuMeter()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.model: TensorModel | None = None
        self.worker: InferenceWorker | None = None
        self.transport: MqttTransport | None = None
        self.core: AgentCore | None = None
        self.outbox: Outbox | None = None
        self._results: IO[str] | None = None
        self.exit_code = 0

    # --------------------------------------------------------------- run --

    async def run(self) -> int:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        s.data_dir.mkdir(parents=True, exist_ok=True)
        spool = SqliteSpool(s.data_dir / "spool.sqlite3", s.spool_max_messages, s.spool_max_bytes)
        self.outbox = Outbox(spool)
        now = time.time()
        self.core = AgentCore(
            CoreConfig(
                device_id=s.device_id,
                agent_version=__version__,
                keepalive_s=s.keepalive_s,
                telemetry_interval_s=s.telemetry_interval_s,
                labels=dict(s.labels),
            ),
            hardware_profile(s.data_dir),
            self._sample,
            started_at=now,
        )
        self._load_model()
        mqtt_fields = parse_broker_url(s.broker)
        if s.mqtt_username:
            mqtt_fields["username"] = s.mqtt_username
        password = s.mqtt_password()
        if password:
            mqtt_fields["password"] = password
        if s.ca_file:
            mqtt_fields["ca_file"] = str(s.ca_file)
        config = MqttConfig(
            **mqtt_fields, keepalive_s=s.keepalive_s, protocol=s.mqtt_protocol, reconnect_max_s=s.reconnect_max_s
        )
        transport = self.transport = MqttTransport(config, s.device_id, will=self.core.will(now), name=s.device_id)
        transport.on_connect = self._on_connect
        transport.on_message = self._on_message
        transport.on_published = self._on_published
        transport.on_refused = self._on_refused
        self._install_signals()
        self._execute([self.core.event("started", f"agent {__version__} started", now)])
        transport.start()
        self._start_input()
        self.notifier.ready(f"device {s.device_id}")
        ticker = asyncio.create_task(self._tick_forever())
        try:
            await self._stop.wait()
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

    def _install_signals(self) -> None:
        assert self._loop is not None
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self._loop.add_signal_handler(sig, self.request_stop)

    def _load_model(self) -> None:
        s = self.settings
        if s.model is None:
            return
        try:
            self.model = TensorModel(s.model, threads=s.threads)
        except ModelLoadError as exc:
            log.error("%s", exc)
            assert self.core is not None
            self._execute([self.core.event("error", str(exc), time.time())])
            return
        if s.results is not None:
            self._results = open(s.results, "a", encoding="utf-8")  # noqa: SIM115 - closed in _shutdown
        self.worker = InferenceWorker(self.model, self.counters, queue_size=s.queue_size, results=self._results)
        self.worker.start()
        log.info("serving %s", s.model)

    def _start_input(self) -> None:
        source = self.settings.input
        if source is None:
            return
        if self.worker is None:
            log.warning("input %s given but no model is loaded; ignoring it", source)
            return
        worker = self.worker

        def read() -> None:
            try:
                if source == "-":
                    n = read_json_lines(sys.stdin, worker.submit, self.counters.record_error)
                else:
                    with open(source, encoding="utf-8") as f:
                        n = read_json_lines(f, worker.submit, self.counters.record_error)
                log.info("input %s: %d records read", source, n)
            except OSError as exc:
                log.error("cannot read input %s: %s", source, exc)

        threading.Thread(target=read, name="input", daemon=True).start()

    def _sample(self, interval_s: float) -> TelemetrySample:
        assert self.outbox is not None
        return TelemetrySample(
            cpu_percent=self._cpu.percent(),
            rss_bytes=rss_bytes(),
            temperature_c=temperature_c(),
            inference=self.counters.snapshot(interval_s),
            spool_depth=len(self.outbox.spool),
            spool_dropped=self.outbox.spool.dropped,
        )

    # ------------------------------------------------------------ core --

    def _execute(self, actions: list[Action]) -> None:
        transport, outbox = self.transport, self.outbox
        assert outbox is not None
        for action in actions:
            if isinstance(action, Subscribe):
                if transport is not None:
                    transport.subscribe(action.filter, action.qos)
            elif isinstance(action, Publish):
                if action.durable:
                    outbox.add(action)
                elif transport is not None:
                    transport.publish(action.topic, action.payload, action.qos, action.retain)
        if transport is not None and transport.connected:
            outbox.pump(transport.publish)

    def _on_connect(self) -> None:
        assert self.core is not None
        self._execute(self.core.on_connected(time.time()))
        self.notifier.status(f"device {self.settings.device_id}: connected")

    def _on_message(self, topic: str, payload: bytes) -> None:
        assert self.core is not None
        self._execute(self.core.on_message(topic, payload, time.time()))

    def _on_published(self, mid: int) -> None:
        assert self.outbox is not None and self.transport is not None
        if self.outbox.acked(mid):
            self.outbox.pump(self.transport.publish)

    def _on_refused(self, reason: str) -> None:
        log.error("giving up: %s", reason)
        self.exit_code = 3
        self.request_stop()

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
                self.notifier.watchdog()
                next_watchdog = time.monotonic() + interval
            wait = max(0.01, min(self.core.next_wakeup() - time.time(), 1.0, interval or 1.0))
            await asyncio.sleep(wait)

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        transport = self.transport
        if transport is not None and self.core is not None:
            goodbye = self.core.goodbye(time.time())
            await transport.stop(final=(goodbye.topic, goodbye.payload, goodbye.qos, goodbye.retain))
        if self.worker is not None:
            self.worker.stop()
        if self._results is not None:
            self._results.close()


def run_agent(settings: AgentSettings) -> int:
    """Run an agent in this process until it is told to stop; returns the exit code."""
    service = AgentService(settings)
    return asyncio.run(service.run())

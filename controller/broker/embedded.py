"""The broker ``slmfleet up`` starts for you, and that the test suite starts on a free port.

mosquitto runs as a child process with a configuration written here when its
binary is found; otherwise amqtt runs inside this process. amqtt speaks MQTT
3.1.1 only, has no shared subscriptions and drops the sessions of anonymous
clients (QoS 1 messages to a disconnected client are not queued), so the
embedded amqtt suits trying slmfleet out, not running a fleet.

Both refuse packets larger than ``max_packet_size`` (``packet_limit``: the
largest command or chunk frame the controller sends, plus room for headers):
a client that sends one is disconnected before the broker buffers it. With
``supervise`` a broker that dies (a crash, an OOM kill, SIGKILL) is started
again on the same port with the same configuration and persistence, after a
backoff that grows while it keeps dying; ``restarts`` and ``last_exit`` say
what happened (the controller exports them as metrics and in its health).
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from controller.broker import dynsec
from controller.errors import BrokerError
from controller.processes import die_with_parent
from wire import chunks as frames
from wire.manifest import DEFAULT_CHUNK_SIZE
from wire.messages import MAX_COMMAND_PAYLOAD

log = logging.getLogger(__name__)

Engine = Literal["auto", "mosquitto", "amqtt"]

AMQTT_LIMITS = (
    "embedded broker is amqtt: MQTT 3.1.1 only, no shared subscriptions, "
    "and sessions of anonymous clients are dropped, so messages to offline devices are not queued. "
    "Install mosquitto or pass --broker mqtt://host:port for a real fleet."
)


#: room for an MQTT packet's fixed header, topic, packet id and MQTT 5 properties around the payload
PACKET_OVERHEAD = 64 * 1024
#: supervision: the first restart waits this long, each further one twice as long, up to the maximum
RESTART_BACKOFF_S = (0.5, 30.0)
#: a broker that ran this long before dying was healthy: the backoff starts over
HEALTHY_AFTER_S = 60.0


@dataclass(frozen=True)
class ClientCertListener:
    """Mutual TLS on the device listener (``controller.pki.broker``): the CA client certificates must chain
    to, the CRL of revoked ones, and the broker's own certificate and key."""

    ca_file: Path
    crl_file: Path
    cert_file: Path
    key_file: Path
    #: the CA devices verify the broker with (None: not ours to hand out)
    server_ca_file: Path | None = None


def packet_limit(chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """The largest MQTT packet a slmfleet broker must carry: a command (a Deploy carries the signed manifest,
    up to ``MAX_COMMAND_PAYLOAD``) or a chunk frame (``chunk_size`` plus its header), plus the MQTT headers.
    Nothing a device may send is larger (telemetry and events are capped far lower)."""
    return max(MAX_COMMAND_PAYLOAD, chunk_size + frames.HEADER_SIZE) + PACKET_OVERHEAD


#: ports this process handed out recently: a port is free again once its first taker closed it, and a
#: second caller that is given it before the first one binds would collide (a fleet asks for several at once)
_recent_ports: deque[int] = deque(maxlen=256)
_recent_lock = threading.Lock()
#: the OS's randomness, never the seedable module-level generator (a seeded simulation would pick the same ports)
_port_rng = random.SystemRandom()


def _listening_range() -> range:
    """Ports below the kernel's ephemeral range: no outgoing connection is ever given one of them, so a port found
    free here stays free until its taker binds it, even while many connections come and go on the machine."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(max(10_000, low - 16_000), low)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now and that this process did not hand out recently (a random one
    below the ephemeral range where there is such a range, else one the kernel picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = _listening_range()
    with _recent_lock:
        for attempt in range(64):
            with socket.socket(family, socket.SOCK_STREAM) as s:
                port = _port_rng.choice(candidates) if candidates and attempt < 48 else 0
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                port = int(s.getsockname()[1])
            if port not in _recent_ports:
                break
        _recent_ports.append(port)
        return port


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str | None:
    """Path of the mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def mosquitto_config(
    host: str,
    port: int,
    state_dir: Path,
    extra: str = "",
    allow_anonymous: bool = True,
    tls_cert_file: Path | None = None,
    tls_key_file: Path | None = None,
    dynsec_file: Path | None = None,
    max_packet_size: int | None = None,
    client_certs: ClientCertListener | None = None,
    controller_port: int | None = None,
) -> str:
    """A mosquitto.conf for a private single-node broker; the comments say why each line is there."""
    lines = ["# Written by slmfleet; regenerated on every start."]
    if client_certs is not None:
        if controller_port is None:
            raise BrokerError("a broker with client certificates needs a loopback port for the controller")
        lines += [
            "# The controller's own listener: loopback only, no client certificate.",
            f"listener {controller_port} 127.0.0.1",
        ]
    lines += [f"listener {port} {host}"]
    if client_certs is not None:
        lines += [
            "# Devices: TLS with a client certificate from the device CA (mutual TLS). Its common name is the",
            "# user name (ACLs) and the client id (no device can take over another's session).",
            f"cafile {Path(client_certs.ca_file).resolve()}",
            f"certfile {Path(client_certs.cert_file).resolve()}",
            f"keyfile {Path(client_certs.key_file).resolve()}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "# Revoked certificates; the controller rewrites it and sends SIGHUP, which reloads it.",
            f"crlfile {Path(client_certs.crl_file).resolve()}",
        ]
    elif tls_cert_file is not None and tls_key_file is not None:
        lines += [
            "# TLS only on this listener (mqtts://); clients verify this certificate.",
            f"certfile {Path(tls_cert_file).resolve()}",
            f"keyfile {Path(tls_key_file).resolve()}",
            "tls_version tlsv1.2",
        ]
    if dynsec_file is not None:
        plugin = dynsec.plugin_path()
        if plugin is None:
            raise BrokerError(
                f"mosquitto's dynamic security plugin ({dynsec.PLUGIN_NAME}) is not installed; it comes with"
                " mosquitto 2 (Debian/Ubuntu: package mosquitto), or set SLMFLEET_DYNSEC_PLUGIN to its path"
            )
        allow_anonymous = False
        lines += [
            "# Per-device credentials and ACLs, managed by the controller (controller/broker/dynsec.py).",
            f"plugin {plugin}",
            f"plugin_opt_config_file {Path(dynsec_file).resolve()}",
        ]
    lines += [
        f"allow_anonymous {'true' if allow_anonymous else 'false'}",
        "# Retained device states and persistent sessions survive a broker restart.",
        "persistence true",
        f"persistence_location {state_dir}/",
        "autosave_interval 60",
        f"log_dest file {state_dir}/mosquitto.log",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "# Devices reconnect after outages with queued commands; a QoS 1 queue of 1000 (the",
        "# default) silently drops the rest, so queue more per client.",
        "max_queued_messages 20000",
        "max_inflight_messages 100",
        "set_tcp_nodelay true",
        "# The largest packet: a command or a chunk frame and its headers. A client that sends more is",
        "# disconnected before the broker buffers it (one 100 MB publish would otherwise reach the controller).",
        f"max_packet_size {max_packet_size or packet_limit()}",
    ]
    if os.geteuid() == 0:
        # mosquitto started as root drops to user 'mosquitto', which cannot write our state directory.
        lines.append("user root")
    else:
        lines.append(f"user {getpass.getuser()}")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (what the broker keeps next to it is private too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


class EmbeddedBroker:
    """A private broker on ``host:port``: ``start()``, ``stop()``, ``restart()``."""

    def __init__(
        self,
        state_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        engine: Engine = "auto",
        extra_config: str = "",
        allow_anonymous: bool = True,
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
        dynsec_file: Path | None = None,
        max_packet_size: int | None = None,
        supervise: bool = False,
        client_certs: ClientCertListener | None = None,
    ) -> None:
        """``supervise``: start the broker again whenever it dies (see the module docstring). ``client_certs``:
        devices need a client certificate; the controller then connects to ``controller_url`` (loopback)."""
        if (tls_cert_file is None) != (tls_key_file is None):
            raise BrokerError("the embedded broker's TLS certificate and key go together: give both or neither")
        self.tls_cert_file = tls_cert_file
        self.tls_key_file = tls_key_file
        self.dynsec_file = dynsec_file
        self.state_dir = Path(state_dir)
        self.allow_anonymous = allow_anonymous
        self.host = host
        self.port = port or free_port(host)
        self.requested = engine
        self.extra_config = extra_config
        self.max_packet_size = max_packet_size or packet_limit()
        self.client_certs = client_certs
        self.controller_port = free_port("127.0.0.1") if client_certs is not None else None
        self.engine: Literal["mosquitto", "amqtt"] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._amqtt: _AmqttThread | None = None
        self.supervise = supervise
        #: times a supervised broker that died was started again
        self.restarts = 0
        #: how the broker last died ("exit code 1", "killed by signal 9"), None while it never did
        self.last_exit: str | None = None
        self.last_exit_at: float | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._binary: str | None = None
        self._timeout = 15.0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None or self.client_certs is not None

    @property
    def controller_url(self) -> str:
        """Where the controller connects: the loopback listener when devices need certificates, else ``url``."""
        return f"mqtt://127.0.0.1:{self.controller_port}" if self.controller_port is not None else self.url

    def reload(self) -> None:
        """Have mosquitto read its files again (SIGHUP): a new CRL takes effect for new connections."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGHUP)

    @property
    def protocol(self) -> str:
        """The newest MQTT version the broker speaks."""
        return "5" if self.engine == "mosquitto" else "3.1.1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """The broker process (or amqtt's thread) is alive."""
        if self._proc is not None:
            return self._proc.poll() is None
        return self._amqtt is not None and self._amqtt.alive

    def start(self, timeout: float = 15.0) -> str:
        """Start the broker and wait until it accepts connections; returns its URL."""
        self._stopping.clear()
        self._timeout = timeout
        url = self._start(timeout)
        if self.supervise and (self._supervisor is None or not self._supervisor.is_alive()):
            self._supervisor = threading.Thread(target=self._supervise, name="broker-supervisor", daemon=True)
            self._supervisor.start()
        return url

    def _start(self, timeout: float) -> str:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        binary = mosquitto_binary() if self.requested in ("auto", "mosquitto") else None
        if self.requested == "mosquitto" and binary is None:
            raise BrokerError("mosquitto was asked for but its binary is not on PATH; install mosquitto")
        if port_open(self.host, self.port):
            raise BrokerError(
                f"port {self.port} on {self.host} is already in use; choose another with --broker-port "
                "or point at that broker with --broker mqtt://host:port"
            )
        if self.tls and binary is None:
            raise BrokerError("the embedded broker serves TLS with mosquitto only; install mosquitto")
        if self.client_certs is not None and binary is None:
            raise BrokerError("client certificates for devices (device_certificates) need mosquitto; install mosquitto")
        if self.dynsec_file is not None and binary is None:
            raise BrokerError("per-device broker credentials (broker_auth dynsec) need mosquitto; install mosquitto")
        if binary is not None:
            self._binary = binary
            self._start_mosquitto(binary, timeout)
        else:
            log.warning("%s", AMQTT_LIMITS)
            self._amqtt = _AmqttThread(self.host, self.port, self.max_packet_size)
            self._amqtt.start(timeout)
            self.engine = "amqtt"
        return self.url

    # ------------------------------------------------------------ supervision --

    def _supervise(self) -> None:
        """Watch the broker; start it again when it dies, with a backoff while it keeps dying."""
        low, high = RESTART_BACKOFF_S
        delay = low
        started_at = time.monotonic()
        while not self._stopping.is_set():
            if self.running:
                self._stopping.wait(0.2)
                continue
            if self._stopping.is_set():
                return
            how = self._exit_description()
            self.last_exit, self.last_exit_at = how, time.time()
            if time.monotonic() - started_at >= HEALTHY_AFTER_S:
                delay = low
            log.error(
                "embedded %s on %s died (%s): %s; starting it again in %.1f s (restart %d)",
                self.engine or "broker",
                self.url,
                how,
                self._log_tail(),
                delay,
                self.restarts + 1,
            )
            if self._stopping.wait(delay):
                return
            try:
                self._start(self._timeout)
            except BrokerError as exc:
                log.error("restarting the embedded broker failed: %s; trying again", exc)
                delay = min(high, delay * 2)
                continue
            self.restarts += 1
            started_at = time.monotonic()
            delay = min(high, delay * 2)
            log.warning(
                "embedded %s restarted on %s (restart %d; persistence kept)", self.engine, self.url, self.restarts
            )

    def _exit_description(self) -> str:
        proc = self._proc
        if proc is None:
            return "its thread ended"
        code = proc.returncode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def _start_mosquitto(self, binary: str, timeout: float) -> None:
        conf = self.state_dir / "mosquitto.conf"
        write_private(
            conf,
            mosquitto_config(
                self.host,
                self.port,
                self.state_dir.resolve(),
                self.extra_config,
                self.allow_anonymous,
                self.tls_cert_file,
                self.tls_key_file,
                self.dynsec_file,
                self.max_packet_size,
                self.client_certs,
                self.controller_port,
            ),
        )
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        stderr = os.fdopen(os.open(self.state_dir / "mosquitto.stderr", flags, 0o600), "ab")  # owned by the child
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the broker: we stop it in order
            preexec_fn=die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        stderr.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with code {self._proc.returncode}: {self._log_tail()}")
            if port_open(self.host, self.port) and (
                self.controller_port is None or port_open("127.0.0.1", self.controller_port)
            ):
                self.engine = "mosquitto"
                log.info("embedded mosquitto (pid %d) listening on %s", self._proc.pid, self.url)
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.url} within {timeout:.0f}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        parts = []
        for name in ("mosquitto.stderr", "mosquitto.log"):
            path = self.state_dir / name
            if path.is_file():
                parts.append(path.read_text(errors="replace")[-600:].strip())
        return " | ".join(p for p in parts if p) or "no log output"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``); a supervised one stays stopped."""
        self._stopping.set()
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(timeout)
        if self._proc is not None:
            proc, self._proc = self._proc, None
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if self._amqtt is not None:
            self._amqtt.stop()
            self._amqtt = None

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL), as a crash would (a supervised one is started again)."""
        if self._proc is not None:
            proc = self._proc
            if not self.supervise:
                self._proc = None
            proc.kill()
            proc.wait(5)
        elif self._amqtt is not None:
            if self.supervise:
                self._amqtt.stop()
            else:
                self.stop()

    def restart(self, timeout: float = 15.0) -> None:
        """Stop and start again on the same port with the same state."""
        self.stop()
        deadline = time.monotonic() + timeout
        while port_open(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.start(timeout)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PacketTooLarge(Exception):
    """A client sent a packet over the cap: amqtt's reader ends the connection on an unexpected error."""


def _capped_broker_class(max_packet_size: int) -> Any:
    """amqtt's Broker, reading each client's packets through a reader that refuses one over the cap before
    reading its body (amqtt has no such setting; a publish is read with one ``read(n)`` of its length)."""
    from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
    from amqtt.broker import Broker

    class CappedReader(StreamReaderAdapter):
        async def read(self, n: int = -1) -> bytes:
            if n > max_packet_size:
                raise _PacketTooLarge(f"a packet of {n} bytes is over the {max_packet_size} byte cap")
            return await super().read(n)

    if not hasattr(Broker, "_client_connected"):  # another amqtt: no cap rather than no broker
        log.warning("this amqtt version cannot be capped: packets of any size are accepted (install mosquitto)")
        return Broker

    class CappedBroker(Broker):
        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            await self._client_connected(listener_name, CappedReader(reader), StreamWriterAdapter(writer))

    return CappedBroker


class _AmqttThread:
    """amqtt's broker on its own event loop in a daemon thread."""

    def __init__(self, host: str, port: int, max_packet_size: int) -> None:
        self.host, self.port = host, port
        self.max_packet_size = max_packet_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float) -> None:
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise BrokerError(f"amqtt did not start within {timeout:.0f}s")
        if self._error is not None:
            raise BrokerError(f"amqtt failed to start: {self._error}") from self._error

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            broker_class = _capped_broker_class(self.max_packet_size)
        except ImportError as exc:  # pragma: no cover - amqtt is a controller dependency
            self._error = exc
            self._ready.set()
            return
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        try:
            self._broker = broker_class(config, loop=loop)
            loop.run_until_complete(self._broker.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.close()

    def stop(self) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
        try:
            future.result(10)
        except Exception as exc:
            log.debug("amqtt shutdown: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

"""A paho MQTT client driven by an asyncio event loop.

Why not ``loop_start()``: paho's threaded loop costs a thread per client and
uses ``select()``, which stops connecting clients past about 340 per process
on these machines. Here every client's socket is registered with the asyncio
loop (epoll), so one loop runs one agent on a device or thousands in the
simulator, and the controller's connection lives in its own loop thread.

The transport reconnects forever with capped, jittered exponential backoff
(through several brokers in turn when given several, e.g. the nodes of a cluster),
re-applies its subscriptions after every reconnect, speaks MQTT 5 where the
broker does and falls back to 3.1.1 where it does not (``protocol="auto"``).
When the broker refuses the credentials it stops retrying, or, with
``refused_retry_s``, tries again at that slow pace (a device whose
credentials come back, or a broker whose auth was broken for a while).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import sys
import threading
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.transport import paho_speed
from agent.transport.base import TransportRefused, Will

log = logging.getLogger(__name__)

Protocol = Literal["auto", "5", "3.1.1"]

paho_speed.install()

#: packets read in one turn of the loop when more are already waiting (then the loop serves the others)
READ_BATCH = 256

if sys.platform != "win32":
    import fcntl
    import termios

    def _received(sock: Any) -> int:
        try:
            buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):
            return 0
        return int.from_bytes(buf, sys.byteorder)

else:  # pragma: no cover - no FIONREAD on sockets there: what the poll reports, one packet a turn

    def _received(sock: Any) -> int:
        return 0


def _waiting(sock: Any) -> int:
    """Bytes received and not read yet: in the read buffer, decrypted by TLS, in the kernel."""
    if isinstance(sock, paho_speed.BufferedReads):
        buffered = sock.buffered()
        if buffered:
            return buffered
        sock = sock.raw
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return sock.pending()
    return _received(sock)


# CONNACK reason codes (MQTT 5 numbering; paho maps 3.1.1 return codes onto them).
_RC_UNSUPPORTED_PROTOCOL = 132
_RC_REFUSED_FOR_GOOD = {133, 134, 135, 138, 140}  # bad client id, bad credentials, not authorized, banned, bad auth


@dataclass(frozen=True)
class MqttConfig:
    """How to reach the broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 30
    protocol: Protocol = "auto"
    persistent_session: bool = True
    session_expiry_s: int = 7 * 24 * 3600
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    #: after a refusal for good (bad credentials, not authorized, banned): 0 stops retrying, more tries
    #: again after about this many seconds
    refused_retry_s: float = 0.0
    connect_timeout_s: float = 5.0
    max_inflight: int = 100
    #: the largest packet this client accepts: sent to an MQTT 5 broker in CONNECT (it then discards larger
    #: messages instead of sending them) and enforced on receipt (3.1.1); None: no limit
    max_packet_size: int | None = None
    #: every broker to try, in turn, as (host, port): the nodes of a cluster. Empty: ``host``:``port`` alone.
    #: A client starts at the one its client id picks (``first_server``: a fleet spreads over the nodes); after
    #: a failed attempt or a lost connection it tries the next one; the backoff grows per full round.
    servers: tuple[tuple[str, int], ...] = ()

    @property
    def url(self) -> str:
        return self.server_url(0)

    @property
    def rotation(self) -> tuple[tuple[str, int], ...]:
        """The brokers tried in turn (at least ``host``:``port``)."""
        return self.servers or ((self.host, self.port),)

    def server_url(self, index: int) -> str:
        host, port = self.rotation[index % len(self.rotation)]
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{port}"


def parse_broker_url(url: str) -> dict[str, Any]:
    """Split ``mqtt://[user:pass@]host:port`` (or ``mqtts://``) into MqttConfig fields.

    A comma-separated list of URLs names the nodes of a cluster (``servers``, tried in turn): they share one
    scheme, and the credentials of the first URL that has any."""
    urls = [u.strip() for u in url.split(",") if u.strip()]
    if not urls:
        raise ValueError(f"broker URL {url!r} names no broker")
    each = [_parse_one(u) for u in urls]
    fields = dict(each[0])
    if len(each) > 1:
        if any(f["tls"] != fields["tls"] for f in each):
            raise ValueError(f"broker URLs {url!r} mix mqtt:// and mqtts://: use one scheme for every node")
        for f in each:
            for key in ("username", "password"):
                if key in f and key not in fields:
                    fields[key] = f[key]
        fields["servers"] = tuple((f["host"], f["port"]) for f in each)
    return fields


def _parse_one(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    tls = parts.scheme in ("mqtts", "ssl")
    fields: dict[str, Any] = {
        "host": parts.hostname,
        "port": parts.port or (8883 if tls else 1883),
        "tls": tls,
    }
    if parts.username:
        fields["username"] = unquote(parts.username)
    if parts.password:
        fields["password"] = unquote(parts.password)
    return fields


def first_server(client_id: str, count: int) -> int:
    """The index in a broker rotation of ``count`` nodes where a client starts: fixed per client id, spread."""
    return zlib.crc32(client_id.encode()) % count if count > 1 else 0


class _MiscTicker:
    """Calls ``loop_misc`` (keepalive pings, timeouts) for every transport on one loop, once a second."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _MiscTicker] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._members: set[MqttTransport] = set()
        self._handle: asyncio.TimerHandle | None = None

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> _MiscTicker:
        ticker = cls._by_loop.get(loop)
        if ticker is None:
            ticker = cls._by_loop[loop] = cls(loop)
        return ticker

    def add(self, transport: MqttTransport) -> None:
        self._members.add(transport)
        if self._handle is None:
            self._handle = self._loop.call_later(1.0, self._tick)

    def discard(self, transport: MqttTransport) -> None:
        self._members.discard(transport)

    def _tick(self) -> None:
        for transport in list(self._members):
            transport._misc()
        self._handle = self._loop.call_later(1.0, self._tick) if self._members else None


class MqttTransport:
    """One MQTT connection, implementing ``agent.transport.base.Transport``.

    Create it and call ``start()`` inside the loop's thread. ``publish`` may be
    called from any thread; callbacks run in the loop's thread.
    """

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        *,
        will: Will | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        name: str | None = None,
        on_connect: Callable[[], None] | None = None,
        on_message: Callable[[str, bytes], None] | None = None,
        on_published: Callable[[int], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        on_oversize: Callable[[str, int], None] | None = None,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.will = will
        self.name = name or client_id
        self._loop = loop or asyncio.get_running_loop()
        self._loop_thread: int | None = None
        self._protocol_v5 = config.protocol in ("auto", "5")
        self._client: mqtt.Client | None = None
        self._sock: Any = None
        #: a write of what paho queued is scheduled on the loop (see _on_register_write)
        self._flush_scheduled = False
        #: the socket is registered with the loop for writing (its buffer was full)
        self._writer_added = False
        #: turns of the loop that read from the socket (several packets are read in one when they are waiting)
        self.read_turns = 0
        self._subs: dict[str, int] = {}
        self._connected = False
        self._got_connack = False
        self._stopping = False
        self._attempt = 0
        #: which of ``config.rotation`` this client connects (or tries to connect) to: it starts at the node its
        #: client id picks, so a fleet given the same list spreads over the nodes
        self._server = first_server(client_id, len(config.rotation))
        self._reconnect_handle: asyncio.TimerHandle | None = None
        self._connack_timer: asyncio.TimerHandle | None = None
        self._logged_failure = False
        self._closed: asyncio.Future[None] | None = None
        self.refused: str | None = None
        self.connects = 0
        #: the broker's own limit on packets from us (MQTT 5 CONNACK), None when it announced none
        self.server_max_packet: int | None = None
        #: messages dropped because they exceeded ``config.max_packet_size`` (only a 3.1.1 broker sends them)
        self.oversize_dropped = 0
        self.on_oversize = on_oversize
        self._renewing = False
        self.on_connect = on_connect
        self._subscribing: dict[int, list[str]] = {}
        #: filters the broker refused, with how many times in a row (asked again with backoff)
        self._sub_refusals: dict[str, int] = {}
        self.on_disconnect = on_disconnect
        self.on_message = on_message
        self.on_published = on_published
        self.on_refused = on_refused

    # ------------------------------------------------------------ public --

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def server_url(self) -> str:
        """The broker this client is connected to (or trying next), from ``config.rotation``."""
        return self.config.server_url(self._server)

    @property
    def protocol(self) -> str:
        """The protocol in use (or being tried): ``"5"`` or ``"3.1.1"``."""
        return "5" if self._protocol_v5 else "3.1.1"

    def start(self) -> None:
        """Begin connecting; retries forever until ``stop()`` or a refusal."""
        self._loop_thread = threading.get_ident()
        _MiscTicker.for_loop(self._loop).add(self)
        self._try_connect()

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """Queue a message while connected; returns its id, or 0 when offline (the caller keeps it)."""
        client = self._client
        if client is None or not self._connected:
            return 0
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS,):
            return 0
        return int(info.mid) or -1

    def reconnect(self, config: MqttConfig | None = None) -> None:
        """Disconnect cleanly (no will) and connect again at once with a fresh client: new credentials, such as a
        renewed client certificate, take effect (``config`` replaces the current one). From any thread."""

        def renew() -> None:
            if config is not None:
                self.config = config
            client = self._client
            if client is None or not self._connected:
                self._drop_failed_client()  # the next attempt builds a client from the new configuration
                return
            self._renewing = True
            client.disconnect()

        # Later, not now: when this is called from a message callback, paho acknowledges that message after the
        # callback returns; disconnecting first would have the broker deliver it again on the new session.
        self._loop.call_soon_threadsafe(renew)

    def subscribe(self, filter_: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and after every reconnect."""
        self._subs[filter_] = qos
        self._call_in_loop(self._subscribe_now, [(filter_, qos)])

    def unsubscribe(self, filter_: str) -> None:
        self._subs.pop(filter_, None)
        self._call_in_loop(self._unsubscribe_now, filter_)

    async def stop(self, final: tuple[str, bytes, int, bool] | None = None, timeout: float = 3.0) -> None:
        """Disconnect cleanly (the broker does not publish the will).

        ``final`` is an optional ``(topic, payload, qos, retain)`` published just before,
        e.g. a retained "offline: shutdown" state.
        """
        self._stopping = True
        self._cancel_timers()
        client = self._client
        if client is None:
            return
        if self._connected:
            self._closed = self._loop.create_future()
            if final is not None:
                done: asyncio.Future[None] = self._loop.create_future()
                prev = self.on_published
                mid = self.publish(*final)

                def _published(m: int) -> None:
                    if m == mid and not done.done():
                        done.set_result(None)
                    if prev is not None:
                        prev(m)

                self.on_published = _published
                if mid:
                    try:
                        await asyncio.wait_for(done, timeout)
                    except TimeoutError:
                        log.warning("%s: final message not acknowledged within %.1fs", self.name, timeout)
            client.disconnect()
            try:
                await asyncio.wait_for(asyncio.shield(self._closed), timeout)
            except TimeoutError:
                log.warning("%s: broker did not close the connection within %.1fs", self.name, timeout)
        self._drop_socket()
        self._connected = False

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash or power loss would (the will fires)."""
        self._stopping = True
        self._cancel_timers()
        sock = self._sock
        self._drop_socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._connected = False
        self._client = None

    # ---------------------------------------------------------- internals --

    def _cancel_timers(self) -> None:
        if self._reconnect_handle is not None:
            self._reconnect_handle.cancel()
            self._reconnect_handle = None
        self._cancel_connack_timer()
        _MiscTicker.for_loop(self._loop).discard(self)

    def _make_client(self) -> mqtt.Client:
        cfg = self.config
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if self._protocol_v5 else mqtt.MQTTv311,
            clean_session=None if self._protocol_v5 else not cfg.persistent_session,
        )
        client.connect_timeout = cfg.connect_timeout_s
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(0)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            # Always verified: the chain against ca_file (or the system's CAs) and the host name.
            client.tls_set(
                ca_certs=cfg.ca_file,
                certfile=cfg.cert_file,
                keyfile=cfg.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            client.tls_insecure_set(False)
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    def _in_loop_thread(self) -> bool:
        return self._loop_thread == threading.get_ident()

    def _call_in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._in_loop_thread():
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _try_connect(self) -> None:
        self._reconnect_handle = None
        if self._stopping:
            return
        if self._client is None:
            self._client = self._make_client()
        cfg = self.config
        host, port = cfg.rotation[self._server % len(cfg.rotation)]
        self._got_connack = False
        try:
            if self._protocol_v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = cfg.session_expiry_s if cfg.persistent_session else 0
                if cfg.max_packet_size is not None:
                    props.MaximumPacketSize = cfg.max_packet_size
                self._client.connect(
                    host,
                    port,
                    keepalive=cfg.keepalive_s,
                    clean_start=not cfg.persistent_session,
                    properties=props,
                )
            else:
                self._client.connect(host, port, keepalive=cfg.keepalive_s)
        except ssl.SSLCertVerificationError as exc:
            # Verification stays on: a certificate the CA did not sign, or issued for another host, is retried
            # with backoff (it may be replaced) but never accepted.
            self._note_failure(
                f"TLS certificate of broker {host}:{port} rejected: {exc.verify_message or exc}"
                f" (CA file: {cfg.ca_file or 'system trust store'})"
            )
            self._drop_failed_client()
            self._schedule_reconnect()
            return
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._note_failure(f"cannot reach broker {host}:{port}: {exc}")
            if cfg.tls:
                self._drop_failed_client()
            self._schedule_reconnect()
            return
        self._cancel_connack_timer()
        self._connack_timer = self._loop.call_later(cfg.connect_timeout_s, self._connack_timeout)

    def _drop_failed_client(self) -> None:
        """Forget a client whose TLS connect failed half-way; the next attempt starts from a fresh one."""
        self._close_socket()
        self._client = None

    def _cancel_connack_timer(self) -> None:
        if self._connack_timer is not None:
            self._connack_timer.cancel()
            self._connack_timer = None

    def _connack_timeout(self) -> None:
        self._connack_timer = None
        if self._got_connack or self._stopping:
            return
        if self._protocol_v5 and self.config.protocol == "auto" and self.connects == 0:
            # Some 3.1.1-only brokers (amqtt) neither answer nor close on a v5 CONNECT with properties.
            self._fall_back_to_311()
            return
        self._note_failure(f"no CONNACK within {self.config.connect_timeout_s:.0f}s")
        self._close_socket()
        self._schedule_reconnect()

    def _note_failure(self, message: str) -> None:
        if not self._logged_failure:
            log.warning("%s: %s (retrying with backoff)", self.name, message)
            self._logged_failure = True
        else:
            log.debug("%s: %s", self.name, message)

    def _schedule_reconnect(self, delay: float | None = None) -> None:
        if self._stopping or self._reconnect_handle is not None:
            return
        if delay is None:
            # A failed attempt or a lost connection: the next broker of the rotation; the backoff grows once
            # every broker was tried (with one broker: after every attempt).
            cfg = self.config
            count = len(cfg.rotation)
            if count > 1:
                self._server = (self._server + 1) % count
            rounds = self._attempt // count
            base = min(cfg.reconnect_max_s, cfg.reconnect_min_s * (2 ** min(rounds, 16)))
            delay = base * random.uniform(0.5, 1.0)
            self._attempt += 1
        self._reconnect_handle = self._loop.call_later(delay, self._try_connect)

    def _fall_back_to_311(self) -> None:
        log.warning("%s: broker does not speak MQTT 5; falling back to MQTT 3.1.1", self.name)
        self._protocol_v5 = False
        self._close_socket()
        self._client = None
        self._schedule_reconnect(delay=0.0)

    def _close_socket(self) -> None:
        sock = self._sock
        self._drop_socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _subscribe_now(self, pairs: list[tuple[str, int]]) -> None:
        if self._client is not None and self._connected and pairs:
            _, mid = self._client.subscribe(pairs)
            if mid is not None:
                self._subscribing[mid] = [f for f, _ in pairs]

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        """Say which subscriptions the broker refused, and ask again later with backoff: an ACL refuses for good,
        but a clustered broker may fail one for a while (NATS while JetStream elects a leader after a node loss)."""
        filters = self._subscribing.pop(mid, [])
        for filter_, reason in zip(filters, reasons or [], strict=False):
            if getattr(reason, "is_failure", False) or (isinstance(reason, int) and reason >= 0x80):
                tries = self._sub_refusals.get(filter_, 0)
                self._sub_refusals[filter_] = tries + 1
                delay = min(self.config.reconnect_max_s, 1.0 * 2 ** min(tries, 16))
                level = logging.WARNING if tries == 0 else logging.DEBUG
                log.log(
                    level,
                    "%s: the broker refused the subscription to %s: %s (asking again)",
                    self.name,
                    filter_,
                    reason,
                )
                self._loop.call_later(delay * random.uniform(0.8, 1.0), self._resubscribe, filter_)
            elif self._sub_refusals.pop(filter_, 0):
                log.info("%s: subscribed to %s", self.name, filter_)

    def _resubscribe(self, filter_: str) -> None:
        qos = self._subs.get(filter_)
        if qos is not None and not self._stopping:
            self._subscribe_now([(filter_, qos)])

    def _unsubscribe_now(self, filter_: str) -> None:
        if self._client is not None and self._connected:
            self._client.unsubscribe(filter_)

    def _misc(self) -> None:
        client = self._client
        if client is not None and self._sock is not None:
            client.loop_misc()

    # ------------------------------------------------------ paho callbacks --

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        if client is not self._client:
            return
        self._got_connack = True
        self._cancel_connack_timer()
        code = reason.value
        if code != 0:
            # A 3.1.1-only broker answers a v5 CONNECT with the 3.1.1 return code 1 ("unacceptable
            # protocol version"), which a v5 parser reads as a non-failure code: only 0 is success.
            if code in (1, _RC_UNSUPPORTED_PROTOCOL) and self._protocol_v5 and self.config.protocol == "auto":
                self._fall_back_to_311()
                return
            if code in _RC_REFUSED_FOR_GOOD:
                first = self.refused is None
                self.refused = f"broker refused the connection: {reason}"
                retry = self.config.refused_retry_s
                self._drop_socket()
                if retry > 0:
                    if first:
                        log.error("%s: %s; trying again every %.0f s", self.name, self.refused, retry)
                    else:
                        log.debug("%s: %s", self.name, self.refused)
                    self._schedule_reconnect(delay=retry * random.uniform(0.8, 1.0))
                else:
                    log.error("%s: %s; not retrying", self.name, self.refused)
                    self._stopping = True
                if first and self.on_refused is not None:
                    self.on_refused(self.refused)
                return
            self._note_failure(f"broker refused the connection: {reason} ({code})")
            self._drop_socket()
            self._schedule_reconnect()
            return
        self._connected = True
        self._attempt = 0
        self.connects += 1
        self.server_max_packet = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        if self._logged_failure or self.refused is not None:
            log.info("%s: connected to %s", self.name, self.server_url)
        self._logged_failure = False
        self.refused = None
        self._subscribe_now(list(self._subs.items()))
        if self.on_connect is not None:
            try:
                self.on_connect()
            except Exception:
                log.exception("%s: on_connect handler failed", self.name)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        if client is not self._client:
            return
        was_connected = self._connected
        self._connected = False
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if self._stopping:
            return
        if self._renewing:  # our own clean disconnect, to connect again with new credentials
            self._renewing = False
            self._drop_socket()
            self._client = None
            log.info("%s: reconnecting with renewed credentials", self.name)
            self._schedule_reconnect(delay=0.0)
            return
        if self.refused is not None and self._got_connack and not was_connected:
            return  # the close after this attempt's refusal, which scheduled its own (slow) retry
        if not self._got_connack and self._protocol_v5 and self.config.protocol == "auto" and self.connects == 0:
            # Brokers that only speak 3.1.1 may close the socket instead of answering a v5 CONNECT.
            self._fall_back_to_311()
            return
        if was_connected:
            log.warning("%s: connection lost (%s); reconnecting", self.name, reason)
            if self.on_disconnect is not None:
                try:
                    self.on_disconnect(str(reason))
                except Exception:
                    log.exception("%s: on_disconnect handler failed", self.name)
        else:
            self._note_failure(f"connection closed before it was accepted ({reason})")
        self._schedule_reconnect()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:  # paho hands it over all the same
            log.warning("%s: dropped a message whose topic is not UTF-8", self.name)
            return
        self._deliver(topic, message.payload)

    def _deliver(self, topic: str, payload: bytes | bytearray) -> None:
        """A received message to ``on_message`` (from paho's callback, or ``paho_speed.read_publishes``)."""
        handler = self.on_message
        if handler is None:
            return
        limit = self.config.max_packet_size
        if limit is not None and len(payload) > limit:
            # An MQTT 5 broker never sends these (CONNECT told it the limit); a 3.1.1 one may: drop before copying.
            self.oversize_dropped += 1
            if self.on_oversize is not None:
                self.on_oversize(topic, len(payload))
            return
        try:
            handler(topic, payload if type(payload) is bytes else bytes(payload))
        except Exception:
            # A faulty handler must never break the network loop.
            log.exception("%s: message handler failed for topic %s", self.name, topic)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if self.on_published is not None:
            try:
                self.on_published(mid)
            except Exception:
                log.exception("%s: on_published handler failed", self.name)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._sock = paho_speed.buffer_reads(client) or sock
        self._call_in_loop(self._loop.add_reader, sock, self._readable, client)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if sock is self._sock:
            self._sock = None
        self._call_in_loop(self._forget_socket, sock)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._in_loop_thread():
            # Coalesce: everything queued in this turn of the loop (the PUBACKs of a batch of received
            # messages, a burst of publishes) goes out in one write after it, not one poll cycle each.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        else:
            self._loop.call_soon_threadsafe(self._add_writer, sock, client)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if not self._in_loop_thread():
            self._loop.call_soon_threadsafe(self._remove_writer, sock)
        elif self._writer_added:
            self._remove_writer(sock)

    # ---------------------------------------------------- loop plumbing --

    def _readable(self, client: mqtt.Client) -> None:
        self.read_turns += 1
        client.loop_read()
        # Whole packets often arrive together: read what is already here in this turn (bounded). The PUBLISH
        # packets lying whole in the read buffer are taken by paho_speed.read_publishes, the rest by paho.
        sock = self._sock
        budget = READ_BATCH - 1
        while budget > 0:
            if sock is None or sock is not self._sock:
                return
            if isinstance(sock, paho_speed.BufferedReads):
                budget -= paho_speed.read_publishes(client, sock, self._deliver, budget)
                if budget <= 0 or sock is not self._sock:
                    break
            if _waiting(sock) <= 0:
                return
            client.loop_read()
            budget -= 1
        if sock is not None and sock is self._sock and _waiting(sock) > 0:
            # more is here, some of it maybe only in the read buffer (no poll would report it): go on next turn
            self._loop.call_soon(self._readable, client)

    def _writable(self, sock: Any, client: mqtt.Client) -> None:
        client.loop_write()
        if not client.want_write():  # all written (also when paho had already said so: a late add_writer)
            self._remove_writer(sock)

    def _flush(self) -> None:
        self._flush_scheduled = False
        sock, client = self._sock, self._client
        if sock is None or client is None:
            return
        client.loop_write()
        if client.want_write() and not self._writer_added:  # the socket's buffer is full: the rest when it drains
            self._add_writer(sock, client)

    def _add_writer(self, sock: Any, client: mqtt.Client) -> None:
        if sock is self._sock and sock.fileno() >= 0:
            self._loop.add_writer(sock, self._writable, sock, client)
            self._writer_added = True

    def _remove_writer(self, sock: Any) -> None:
        self._writer_added = False
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    def _forget_socket(self, sock: Any) -> None:
        self._writer_added = False
        for remove in (self._loop.remove_reader, self._loop.remove_writer):
            with contextlib.suppress(ValueError, OSError):
                remove(sock)

    def _drop_socket(self) -> None:
        sock = self._sock
        self._sock = None
        if sock is not None:
            self._forget_socket(sock)


def ensure_started(transport: MqttTransport) -> None:
    """Start ``transport`` from any thread."""
    transport._loop.call_soon_threadsafe(transport.start)


def raise_if_refused(transport: MqttTransport) -> None:
    """Raise TransportRefused when the broker refused ``transport`` for good."""
    if transport.refused:
        raise TransportRefused(transport.refused)

"""paho-mqtt's MQTT 5 PUBLISH decoding without its per-message table building.

paho 2.x gives every received MQTT 5 PUBLISH a fresh ``Properties`` object: its constructor
rebuilds three lookup tables (27 property names, their types and packet types) and ``unpack``
first clears all 27 names one ``hasattr`` at a time, about 20 us of CPU per message on these
machines, more than validating the payload. ``PublishProperties`` is the same class with those
tables shared (paho never changes them) and with nothing to clear on a fresh object; a PUBLISH
that carries properties is decoded by paho's own ``unpack`` as before, into the same attributes.

``install()`` points paho's PUBLISH decoder (``paho.mqtt._packet``) at it, once, and only when that
module still looks up ``Properties`` the way the supported paho versions do.
"""

from __future__ import annotations

from typing import Any

from paho.mqtt import client as paho_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class PublishProperties(Properties):
    """``Properties`` whose tables are built once; identical to paho's for every packet type."""

    _TABLES: dict[str, Any] | None = None

    def __init__(self, packetType: int) -> None:
        tables = PublishProperties._TABLES
        if tables is None:
            plain = Properties(packetType)
            tables = {k: v for k, v in plain.__dict__.items() if k != "packetType"}
            PublishProperties._TABLES = tables
        # the tables (types, names, properties) are read-only in paho: share them between instances
        self.__dict__.update(tables)
        self.__dict__["packetType"] = packetType

    def unpack(self, buffer: Any) -> tuple[Properties, int]:
        # No properties (a zero length byte) on an object that holds none: nothing to clear or parse.
        if len(buffer) > 0 and buffer[0] == 0 and len(self.__dict__) == len(_TABLE_KEYS):
            return self, 1
        result: tuple[Properties, int] = super().unpack(buffer)
        return result


_TABLE_KEYS = ("packetType", *Properties(PacketTypes.PUBLISH).__dict__.keys() - {"packetType"})


def install() -> bool:
    """Make paho's PUBLISH decoder use ``PublishProperties``; False when this paho decodes differently."""
    try:
        from paho.mqtt import _packet
    except ImportError:  # another paho layout: leave it as it is
        return False
    current = getattr(_packet, "Properties", None)
    if current is PublishProperties:
        return True
    if current is not Properties:
        return False
    _packet.Properties = PublishProperties  # type: ignore[misc]
    return True


#: bytes read from the socket at once (at most): a few hundred telemetry messages
READ_SIZE = 64 * 1024


class BufferedReads:
    """A connected socket whose reads paho takes from a buffer filled by one ``recv`` at a time.

    paho reads each packet with three or four ``recv`` calls (its type byte, its length bytes one by
    one, then the rest); under load the packets arrive together, and here one system call fetches many
    of them. Everything else (send, fileno, close, TLS's pending) is the socket's own. What is buffered
    is invisible to the event loop's poll: whoever reads must go on while ``buffered()`` is not zero.
    """

    __slots__ = ("_buf", "_pos", "raw")

    def __init__(self, sock: Any) -> None:
        self.raw = sock
        self._buf = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            buf = self.raw.recv(max(bufsize, READ_SIZE))  # raises as the socket does when nothing is there
            if not buf:
                return buf  # the connection closed
            self._buf, pos = buf, 0
        end = pos + bufsize
        self._pos = end
        return buf[pos:end]

    def buffered(self) -> int:
        return max(0, len(self._buf) - self._pos)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def buffer_reads(client: Any) -> Any:
    """Give paho's ``client`` its socket with buffered reads (call right after it opened one); returns it."""
    sock = getattr(client, "_sock", None)
    if sock is None or isinstance(sock, BufferedReads):
        return sock
    wrapped = BufferedReads(sock)
    client._sock = wrapped
    return wrapped


#: MQTT fixed-header types (the high nibble)
_PUBLISH = 0x30
_PUBACK = 0x40


def read_publishes(client: Any, reads: BufferedReads, deliver: Any, limit: int) -> int:
    """Deliver up to ``limit`` QoS 0/1 PUBLISH packets that lie whole in ``reads``' buffer, and queue their
    PUBACKs with paho as one packet; returns how many were taken.

    paho handles each received packet with a dozen Python calls and dictionaries (its read state, an
    ``MQTTMessage``, its callback look-ups, a debug log call) and queues every PUBACK as a packet of its own
    (one ``send`` each). Here a whole PUBLISH is sliced from the buffer, ``deliver(topic, payload)`` is called
    and its 4-byte PUBACK appended to the others of the batch; PUBACKs go out after the batch's callbacks,
    as paho sends each one after its callback. Anything else stops the batch and is left in the buffer for
    paho's own reader, which reads it next: other packet types, QoS 2, MQTT 5 properties, a topic that is
    not UTF-8 or empty, a packet that is not all here yet, anything malformed; so does paho being half-way
    through a packet, or a client in manual-ack mode.
    """
    in_packet = client._in_packet
    if in_packet["command"] != 0 or client._manual_ack or limit <= 0:
        return 0
    v5 = client._protocol == 5
    buf, pos = reads._buf, reads._pos
    end = len(buf)
    acks = bytearray()
    taken = 0
    try:
        while taken < limit and pos + 4 <= end:
            header = buf[pos]
            if header & 0xF0 != _PUBLISH:
                break
            qos = (header >> 1) & 0x03
            if qos > 1:
                break
            # remaining length: 1 to 4 bytes, 7 bits each
            length, shift, i = 0, 0, pos + 1
            while True:
                if i >= end or i - pos > 4:
                    length = -1
                    break
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if byte < 0x80:
                    break
            stop = i + length
            if length < 2 or stop > end:
                break
            topic_len = (buf[i] << 8) | buf[i + 1]
            start = i + 2 + topic_len
            if topic_len == 0:
                break
            mid = 0
            if qos:
                if start + 2 > stop:
                    break
                mid = (buf[start] << 8) | buf[start + 1]
                start += 2
            if v5:
                if start >= stop or buf[start] != 0:  # properties: paho decodes those
                    break
                start += 1
            if start > stop:
                break
            try:
                topic = buf[i + 2 : i + 2 + topic_len].decode()
            except UnicodeDecodeError:
                break
            pos = reads._pos = stop  # taken before the callback, which may re-enter the client
            taken += 1
            deliver(topic, buf[start:stop])
            if qos:
                acks += bytes((_PUBACK, 2, mid >> 8, mid & 0xFF))
            if reads._buf is not buf or client._sock is not reads:  # the callback closed or replaced the socket
                return taken
    finally:
        if taken:
            with client._msgtime_mutex:
                client._last_bytes_received = paho_client.time_func()
            if acks and client._sock is reads:
                client._packet_queue(_PUBACK, bytes(acks), 0, 0)
    return taken

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

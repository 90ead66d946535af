"""The MQTT transport's batched socket work (issue 16): several waiting packets read in one turn of the loop,
their PUBACKs written after it, MQTT 5 PUBLISH properties decoded without paho's per-message tables."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt import _packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties

from agent.transport import mqtt as mqtt_transport
from agent.transport import paho_speed
from agent.transport.mqtt import MqttConfig, MqttTransport
from controller.broker.embedded import EmbeddedBroker
from tests.helpers import LoopThread, RawMqtt, wait_until


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def _subscriber(loop: LoopThread, broker: EmbeddedBroker, got: list[bytes]) -> MqttTransport:
    config = MqttConfig(port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.5, persistent_session=True)
    t = loop.call(lambda: MqttTransport(config, "batch-sub", loop=loop.loop))
    t.on_message = lambda topic, payload: got.append(payload)
    loop.call(t.subscribe, "batch/#", 1)
    loop.call(t.start)
    wait_until(lambda: t.connected, 15, what="subscriber connected")
    return t


@pytest.mark.parametrize("read_batch", [mqtt_transport.READ_BATCH, 2])
def test_waiting_packets_are_read_in_one_turn_and_every_one_is_acknowledged(
    private_broker: EmbeddedBroker,
    requires_mosquitto: None,
    loop: LoopThread,
    read_batch: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a bound of 2 packets a turn, most of the burst waits in the read buffer where no poll sees it:
    the transport must go on reading in the next turns by itself."""
    monkeypatch.setattr(mqtt_transport, "READ_BATCH", read_batch)
    got: list[bytes] = []
    sub = _subscriber(loop, private_broker, got)
    pub = RawMqtt(private_broker.port, "batch-pub")
    try:
        pub.publish("batch/probe", b"probe")
        wait_until(lambda: got == [b"probe"], 10, what="subscription live")
        # Hold the subscriber's loop while the broker sends: the packets wait in its socket together.
        release = threading.Event()
        loop.loop.call_soon_threadsafe(release.wait, 30)
        turns = sub.read_turns
        n = 300
        infos = [pub.client.publish("batch/x", str(i).encode(), qos=1) for i in range(n)]
        for info in infos:
            info.wait_for_publish(30)
        release.set()
        wait_until(lambda: len(got) >= n + 1, 30, what=f"{n} messages")
        assert [int(p) for p in got[1:]] == list(range(n))  # all of them, in order, once
        assert sub.read_turns - turns < n  # at least one turn read several packets
        # Every PUBACK reached the broker: after a connection cut (no DISCONNECT) the persistent session
        # redelivers nothing of the burst, only what is published afterwards. (The broker reads a connection
        # in order: once it acknowledged a message the subscriber sent after the PUBACKs, it has them all.)
        acked: list[int] = []
        sub.on_published = acked.append
        mid = loop.call(sub.publish, "mark/after-burst", b"m", 1, False)
        wait_until(lambda: mid in acked, 10, what="the subscriber's own message acknowledged")
        loop.call(sub.abort)
        again: list[bytes] = []
        sub = _subscriber(loop, private_broker, again)  # the same client id: the broker resumes its session
        pub.publish("batch/after", b"after")
        wait_until(lambda: b"after" in again, 10, what="a message after the reconnect")
        assert again == [b"after"]
    finally:
        pub.close()
        loop.run(sub.stop())


def test_the_transport_s_own_publishes_from_its_loop_are_all_written_and_acknowledged(
    private_broker: EmbeddedBroker, loop: LoopThread
) -> None:
    got: list[bytes] = []
    sub = _subscriber(loop, private_broker, got)
    acked: list[int] = []
    sub.on_published = acked.append
    try:
        # a burst queued in one turn of the loop goes out in one flush after it
        mids = loop.call(lambda: [sub.publish("batch/self", str(i).encode(), 1, False) for i in range(500)])
        assert all(m != 0 for m in mids)
        wait_until(lambda: len(acked) >= 500 and len(got) >= 500, 20, what="500 acknowledged and received")
        assert sorted(acked) == sorted(mids)
        assert [int(p) for p in got] == list(range(500))
    finally:
        loop.run(sub.stop())


def _publish_packet(topic: bytes, payload: bytes, props: bytes) -> bytes:
    """A PUBLISH body (after the fixed header) as an MQTT 5 broker sends it: topic, packet id, properties."""
    return struct.pack("!H", len(topic)) + topic + struct.pack("!H", 7) + props + payload


def test_publish_properties_decode_as_paho_s_own() -> None:
    assert paho_speed.install() and _packet.Properties is paho_speed.PublishProperties
    sent = Properties(PacketTypes.PUBLISH)
    sent.MessageExpiryInterval = 30
    sent.ContentType = "application/json"
    sent.UserProperty = [("a", "1"), ("b", "2")]
    for props in (b"\x00", sent.pack()):
        packet = _publish_packet(b"slmfleet/v1/dev/d/telemetry", b'{"v":1}', props)
        fast = _packet.decode_publish(0x32, packet, mqtt.MQTTv5)
        plain = Properties(PacketTypes.PUBLISH)
        plain.unpack(props)
        assert isinstance(fast.properties, paho_speed.PublishProperties)
        assert fast.properties.json() == plain.json()
        assert fast.payload == b'{"v":1}' and fast.topic == b"slmfleet/v1/dev/d/telemetry" and fast.mid == 7
    assert fast.properties.MessageExpiryInterval == 30 and fast.properties.UserProperty == [("a", "1"), ("b", "2")]
    # the shared tables are paho's own: other packet types still build and check as before
    with pytest.raises(MQTTException):
        paho_speed.PublishProperties(PacketTypes.PUBLISH).SessionExpiryInterval = 5  # not a PUBLISH property
    again = paho_speed.PublishProperties(PacketTypes.PUBLISH)
    again.UserProperty = ("x", "y")
    again.unpack(b"\x00")  # an object holding properties is cleared first, as paho's unpack does
    assert again.json() == {}


def test_buffered_reads_hand_out_the_bytes_in_order_across_refills() -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        reads = paho_speed.BufferedReads(a)
        b.sendall(b"\x30\x05hello\x30\x03abc")
        assert reads.recv(1) == b"\x30" and reads.buffered() == 11  # one recv took everything there
        assert reads.recv(1) == b"\x05" and reads.recv(5) == b"hello"
        assert [reads.recv(1), reads.recv(1), reads.recv(10)] == [b"\x30", b"\x03", b"abc"]  # a short read
        assert reads.buffered() == 0
        with pytest.raises(BlockingIOError):  # empty: the socket's own answer
            reads.recv(1)
        b.sendall(b"more")
        assert reads.recv(2) == b"mo" and reads.recv(2) == b"re"
        assert reads.fileno() == a.fileno()  # the rest is the socket's
        b.close()
        assert reads.recv(1) == b""  # closed
    finally:
        a.close()


# ------------------------------------------------------------- read_publishes: a scripted broker --


def _frame(header: int, body: bytes) -> bytes:
    length, out = len(body), bytearray([header])
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + body


def _publish(topic: str, payload: bytes, qos: int, mid: int, v5: bool, props: bytes = b"\x00") -> bytes:
    body = struct.pack("!H", len(topic.encode())) + topic.encode()
    if qos:
        body += struct.pack("!H", mid)
    return _frame(0x30 | (qos << 1), body + (props if v5 else b"") + payload)


def _read_packet(conn: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    """One whole packet from ``conn`` (``buf`` keeps what was read past it): (header byte, body)."""
    while True:
        if len(buf) >= 2:
            length, shift, i = 0, 0, 1
            while i < len(buf):
                length |= (buf[i] & 0x7F) << shift
                shift += 7
                i += 1
                if buf[i - 1] < 0x80:
                    if len(buf) >= i + length:
                        header, body = buf[0], bytes(buf[i : i + length])
                        del buf[: i + length]
                        return header, body
                    break
        data = conn.recv(65536)
        if not data:
            raise ConnectionError("the client closed the connection")
        buf += data


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_publishes_read_from_the_buffer_arrive_as_paho_s_own_whole_split_or_mixed(
    loop: LoopThread, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scripted broker sends QoS 0, 1 and 2 PUBLISH packets (MQTT 5: some with properties), a PINGRESP and a
    large payload, in pieces that cut packets anywhere: every message is delivered once, in order, with its
    own topic and payload; every QoS 1 one is acknowledged, after its delivery, and QoS 2 goes through paho."""
    v5 = protocol == "5"
    taken: list[int] = []
    real = paho_speed.read_publishes

    def counting(*args: object) -> int:
        n = real(*args)  # type: ignore[arg-type]
        taken.append(n)
        return n

    monkeypatch.setattr(paho_speed, "read_publishes", counting)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("k", "v")]
    expected: list[tuple[str, bytes]] = []
    stream = bytearray()
    acks_expected: list[int] = []
    for i in range(120):
        qos = (0, 1, 1)[i % 3]
        topic, payload = f"slmfleet/v1/dev/d{i % 7}/telemetry", f'{{"n":{i}}}'.encode() * (1 + i % 5)
        if i == 50:
            payload = bytes(range(256)) * 600  # 150 KiB: more than one read buffer
        with_props = v5 and i % 10 == 4
        stream += _publish(topic, payload, qos, 1000 + i, v5, props.pack() if with_props else b"\x00")
        expected.append((topic, payload))
        if qos:
            acks_expected.append(1000 + i)
        if i == 60:
            stream += bytes((0xD0, 0))  # a PINGRESP nobody asked for: paho's
    qos2 = _publish("q2/topic", b"exactly once", 2, 7777, v5)

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got: list[tuple[str, bytes]] = []
    acked_before: list[tuple[int, int]] = []  # (mid, messages delivered when the PUBACK arrived)
    result: dict[str, object] = {}

    def broker() -> None:
        conn, _ = server.accept()
        conn.settimeout(20)
        buf = bytearray()
        try:
            header, _body = _read_packet(conn, buf)
            assert header == 0x10  # CONNECT
            conn.sendall(b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00")
            # pieces of 1 to 997 bytes, then the rest in one send: packets cut at every kind of place
            pos, size = 0, 1
            while pos < len(stream):
                cut = min(len(stream), pos + (size if pos < 40_000 else len(stream)))
                conn.sendall(stream[pos:cut])
                pos, size = cut, (size * 7 + 3) % 997 + 1
            while len(acked_before) < len(acks_expected):
                header, body = _read_packet(conn, buf)
                assert header == 0x40, hex(header)
                acked_before.append((struct.unpack("!H", body[:2])[0], len(got)))
            conn.sendall(qos2)
            header, body = _read_packet(conn, buf)
            result["pubrec"] = (header, struct.unpack("!H", body[:2])[0])
            conn.sendall(_frame(0x62, struct.pack("!H", 7777)))  # PUBREL
            header, body = _read_packet(conn, buf)
            result["pubcomp"] = (header, struct.unpack("!H", body[:2])[0])
        except Exception as exc:  # reported by the test below
            result["error"] = repr(exc)
        finally:
            result["done"] = True
            conn.close()

    thread = threading.Thread(target=broker, daemon=True)
    thread.start()
    config = MqttConfig(port=port, protocol=protocol, reconnect_min_s=0.05, reconnect_max_s=0.5)  # type: ignore[arg-type]
    t = loop.call(lambda: MqttTransport(config, "scripted-sub", loop=loop.loop))
    t.on_message = lambda topic, payload: got.append((topic, payload))
    loop.call(t.start)
    try:
        wait_until(lambda: result.get("done"), 30, what="the scripted broker's exchange")
        assert "error" not in result, result["error"]
        assert got[: len(expected)] == expected  # each once, in order, whole
        assert got[len(expected) :] == [("q2/topic", b"exactly once")]
        assert [mid for mid, _ in acked_before] == acks_expected
        # a PUBACK never comes before its message was handed over
        index = {1000 + i: i for i in range(len(expected))}
        assert all(delivered > index[mid] for mid, delivered in acked_before)
        assert result["pubrec"] == (0x50, 7777) and result["pubcomp"] == (0x70, 7777)
        assert sum(taken) > len(expected) // 2  # most of them came through the buffer path
    finally:
        loop.run(t.stop(timeout=1))
        server.close()

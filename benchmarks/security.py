"""What per-device broker security costs: mosquitto with the dynamic security plugin (a client, a role and
literal ACLs per device, ``allow_anonymous false``) against an anonymous mosquitto, in the same run.

Two private mosquitto brokers with the embedded broker's configuration, one of them with the plugin file
that ``broker_auth = "dynsec"`` uses (controller/broker/dynsec.py):

- enrollment: an in-process controller (ControllerRuntime, ``broker_auth="dynsec"``) enrolls N devices
  with device-bound tokens, one after the other; each enrollment claims the token, creates the device's
  role and client in the broker's plugin (one command round trip; the plugin rewrites its whole JSON
  file on every change, so later enrollments are slower than the first ones) and commits the device row.
  Reported as enrollments per second and the median and p95 of one enrollment (token creation is not
  timed). No baseline: an anonymous broker has nothing to enroll. The controller is stopped before the
  fan-in and its persistent MQTT session ended, so nothing but the subscriber receives the traffic.
- fan-in: N device clients (paho, MQTT 5) publish M telemetry messages each (QoS 1, a real Telemetry
  payload of about 370 bytes) to their own ``slmfleet/v1/dev/{id}/telemetry``, round robin; a few
  threads drive them over selectors (see Fleet). One subscriber on ``slmfleet/v1/#``, in a child process
  of its own, counts arrivals per topic. On the secured broker every device logs in with the credentials
  its enrollment returned (client id = user name = device id, as the plugin requires) and every message
  passes two of the plugin's ACL checks (publishClientSend for the device, publishClientReceive for the
  subscriber, which logs in as the controller's user); on the anonymous broker the same clients log in
  without credentials. The clock runs from the first publish to the last arrival. Trials alternate
  (anonymous, secured, anonymous, ...); medians of the trials are reported, and
  ``acl_vs_anonymous_ratio`` = secured rate / anonymous rate. Every message must arrive: ``lost`` counts
  those that did not, ``refused`` the publishes the broker answered with a failure reason code. Both
  brokers may queue a whole trial for the subscriber (``max_queued_messages``; the embedded broker's
  20000 would drop messages whenever the Python subscriber falls that far behind the devices).
- broker CPU: user + system seconds of the mosquitto process over each trial's fan-in (from
  /proc/PID/stat, 10 ms ticks): per broker (median of the trials), per message, and as the fraction of
  the fan-in's wall time the broker was busy.

Why ratios: the machines are shared and noisy, so only figures from the same run are compared. The
clients are Python and need more CPU per message than mosquitto does, so the broker is not saturated
(``broker_busy_*`` well under 1): the rate ratio says whether the ACL checks show end to end with
clients like these, and ``broker_cpu_acl_vs_anonymous_ratio`` what they cost the broker itself.
"""

from __future__ import annotations

import json
import os
import selectors
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from sqlmodel import Session

from benchmarks.common import JsonProc, wait_for
from benchmarks.delivery import cpu_seconds
from controller.broker import dynsec
from controller.broker.embedded import EmbeddedBroker
from controller.enrollment import tokens
from controller.runtime import ControllerRuntime
from controller.settings import load_settings
from wire import codec, topics
from wire.messages import InferenceStats, LatencySummary, Telemetry

#: threads that drive the device clients (each its share of them, publishing round robin)
DRIVER_THREADS = 4
TRIALS = 3
CONTROLLER_CLIENT_ID = "bench-ctl"
#: unacknowledged QoS 1 messages per client (the embedded broker's max_inflight_messages)
INFLIGHT = 100
#: the subscriber stops waiting when nothing arrived for this long (messages the broker dropped never come)
STALL_S = 10.0

Credentials = list[tuple[str, str | None]]


def device_ids(n: int) -> list[str]:
    return [f"dev-{i:04d}" for i in range(n)]


def payload() -> bytes:
    latency = LatencySummary(p50_ms=3.1, p95_ms=7.9, p99_ms=12.4, mean_ms=3.6, max_ms=15.0, buckets=[(64, 80)])
    msg = Telemetry(
        ts=time.time(),
        seq=1,
        interval_s=10.0,
        uptime_s=3600.0,
        cpu_percent=23.5,
        rss_bytes=118_000_000,
        inference=InferenceStats(count=100, errors=0, latency=latency),
    )
    return codec.encode(msg)


def _failed(rc: ReasonCode | int) -> bool:
    return bool(rc.is_failure) if isinstance(rc, ReasonCode) else rc != 0


# --------------------------------------------------------------- enrollment --


def enroll(broker: EmbeddedBroker, controller_password: str, data_dir: Path, n: int) -> dict[str, Any]:
    """Enroll ``n`` devices through an in-process controller; their credentials and the timings."""
    settings = load_settings(
        data_dir=data_dir,
        broker_url=broker.url,
        broker_auth="dynsec",
        mqtt_username=dynsec.CONTROLLER_USER,
        mqtt_password=controller_password,
        mqtt_client_id=CONTROLLER_CLIENT_ID,
    )
    runtime = ControllerRuntime(settings)
    runtime.start()
    try:
        bridge = runtime.bridge
        assert bridge is not None
        wait_for(lambda: bridge.connected, 30)
        ids = device_ids(n)
        creds: Credentials = []
        latencies: list[float] = []
        with Session(runtime.engine) as session:
            secrets = [tokens.create(session, "bench", timedelta(hours=1), device_id=d)[0] for d in ids]
            started = time.perf_counter()
            for device_id, secret in zip(ids, secrets, strict=True):
                t0 = time.perf_counter()
                enrollment = runtime.enrollment.enroll(session, secret, None)
                session.commit()
                latencies.append(time.perf_counter() - t0)
                if enrollment.mqtt_username != device_id or not enrollment.mqtt_password:
                    raise RuntimeError(f"enrollment of {device_id} returned no broker credentials")
                creds.append((device_id, enrollment.mqtt_password))
            seconds = time.perf_counter() - started
    finally:
        runtime.stop()
    half = max(1, n // 2)
    ordered = sorted(latencies)
    return {
        "credentials": creds,
        "done": len(creds),
        "per_s": n / seconds,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": ordered[min(n - 1, int(n * 0.95))] * 1000,
        # the plugin rewrites its whole JSON file on every change: later enrollments may be slower
        "first_half_p50_ms": statistics.median(latencies[:half]) * 1000,
        "second_half_p50_ms": statistics.median(latencies[half:] or latencies) * 1000,
    }


# ------------------------------------------------------------------- fan-in --


class Subscriber:
    """The counting subscriber, in a child process of its own (``python -m benchmarks.security subscriber``):
    in this process it would share the interpreter lock with the N device clients and fall behind them."""

    def __init__(self, broker: EmbeddedBroker, auth: tuple[str, str] | None, expected: int, deadline_s: float) -> None:
        self.proc = JsonProc("benchmarks.security", "subscriber", broker.port, expected, deadline_s, stdin=True)
        self.proc.send(json.dumps(auth))  # on stdin, not in the process list
        ready = self.proc.read()
        if not ready.get("ready"):
            self.proc.kill()
            raise RuntimeError(f"the subscriber did not subscribe: {ready.get('error')}")

    def result(self) -> dict[str, Any]:
        """What arrived, once all did or the child's deadline or stall limit passed."""
        got = self.proc.read()
        self.proc.wait(30)
        return got

    def kill(self) -> None:
        self.proc.kill()


def subscriber_main(argv: list[str]) -> None:
    """``subscriber PORT EXPECTED DEADLINE_S``, with ``[user, password]`` or ``null`` as a JSON line on stdin.

    Prints ``{"ready": true}`` once subscribed to ``slmfleet/v1/#`` (QoS 1), then, once EXPECTED messages
    arrived (or DEADLINE_S passed, or nothing arrived for STALL_S after the first message), the counts per
    topic and the time of the last arrival."""
    port, expected, deadline_s = int(argv[0]), int(argv[1]), float(argv[2])
    auth = json.loads(sys.stdin.readline())
    per_topic: dict[str, int] = {}
    state = {"received": 0, "first": 0.0, "last": 0.0}
    subscribed = threading.Event()
    done = threading.Event()
    errors: list[str] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub", protocol=mqtt.MQTTv5)
    client.reconnect_delay_set(30, 60)
    if auth is not None:
        client.username_pw_set(auth[0], auth[1])

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if _failed(rc):
            errors.append(f"connection refused: {rc}")
            subscribed.set()
        else:
            c.subscribe(f"{topics.ROOT}/#", qos=1)

    def on_subscribe(c: mqtt.Client, userdata: Any, mid: int, rcs: list[Any], props: Any) -> None:
        if any(_failed(rc) for rc in rcs):
            errors.append(f"subscription refused: {[str(rc) for rc in rcs]}")
        subscribed.set()

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        per_topic[msg.topic] = per_topic.get(msg.topic, 0) + 1
        state["received"] += 1
        state["last"] = now
        if state["received"] == 1:
            state["first"] = now
        if state["received"] >= expected:
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    try:
        ok = subscribed.wait(30) and not errors
        print(json.dumps({"ready": ok, "error": errors[0] if errors else None}), flush=True)
        if not ok:
            return
        cpu0 = os.times()
        deadline = time.monotonic() + deadline_s
        while not done.wait(0.1) and time.monotonic() < deadline:
            if state["received"] and time.time() - state["last"] > STALL_S:
                break  # the broker dropped what is missing: waiting longer changes nothing
        cpu = os.times()
        print(
            json.dumps({**state, "per_topic": per_topic, "cpu_s": cpu.user + cpu.system - cpu0.user - cpu0.system}),
            flush=True,
        )
    finally:
        client.disconnect()
        client.loop_stop()


class Fleet:
    """``len(creds)`` device clients driven by DRIVER_THREADS threads, each with a selector over its share.

    No network thread per client: with 200 of them every publish would wake one (a socket pair write and a
    thread switch under the interpreter lock), and the clients, not the broker, would set the pace. Each
    client is only ever touched by its driver, so its counters need no lock."""

    def __init__(self, broker: EmbeddedBroker, creds: Credentials, m: int, body: bytes, timeout: float) -> None:
        self.broker, self.creds, self.m, self.body, self.timeout = broker, creds, m, body, timeout
        n = len(creds)
        self.acked = [0] * n
        self.refused = [0] * n
        self.connack: list[Any] = [None] * n
        self.clients: list[mqtt.Client] = []
        for i, (device_id, password) in enumerate(creds):
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
            c.max_inflight_messages_set(INFLIGHT)
            if password is not None:
                c.username_pw_set(device_id, password)
            c.on_connect = self._on_connect(i)
            c.on_publish = self._on_publish(i)
            self.clients.append(c)
        self.connected = threading.Semaphore(0)
        self.go = threading.Event()
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        parts = [list(range(k, n, DRIVER_THREADS)) for k in range(min(DRIVER_THREADS, n))]
        self.threads = [threading.Thread(target=self._drive, args=(part,), name="bench-fleet") for part in parts]
        for t in self.threads:
            t.start()

    def _on_connect(self, i: int) -> Any:
        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            self.connack[i] = rc

        return on_connect

    def _on_publish(self, i: int) -> Any:
        def on_publish(client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any) -> None:
            self.acked[i] += 1
            if _failed(rc):
                self.refused[i] += 1

        return on_publish

    def _pump(self, sel: selectors.BaseSelector, part: list[int], timeout: float) -> None:
        """Read what arrived (CONNACKs, PUBACKs) and write what paho queued meanwhile."""
        for key, _ in sel.select(timeout):
            client = self.clients[key.data]
            rc = client.loop_read()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"{self.creds[key.data][0]} lost its connection: {rc}")
        for i in part:
            client = self.clients[i]
            if client.want_write():
                client.loop_write()

    def _until(self, sel: selectors.BaseSelector, part: list[int], done: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        misc = time.monotonic() + 1.0
        while not done():
            if self.stopping.is_set():
                raise RuntimeError("stopped")
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"device clients: {what} not done within {self.timeout:.0f}s")
            if now > misc:  # keepalive pings
                misc = now + 1.0
                for i in part:
                    self.clients[i].loop_misc()
            self._pump(sel, part, 0.05)

    def _drive(self, part: list[int]) -> None:
        sel = selectors.DefaultSelector()
        try:
            for i in part:
                client = self.clients[i]
                client.connect(self.broker.host, self.broker.port, keepalive=60)
                sock = client.socket()
                assert sock is not None
                sel.register(sock, selectors.EVENT_READ, i)
            self._until(sel, part, lambda: all(self.connack[i] is not None for i in part), "CONNACK")
            self.connected.release()
            if not self.go.wait(self.timeout) or self.stopping.is_set():
                return
            pairs = [(self.clients[i], topics.telemetry(self.creds[i][0])) for i in part]
            for _ in range(self.m):
                for client, topic in pairs:
                    client.publish(topic, self.body, qos=1)  # written now, or queued by paho past INFLIGHT
                self._pump(sel, part, 0)
            self._until(sel, part, lambda: all(self.acked[i] >= self.m for i in part), "PUBACK")
        except BaseException as exc:  # reported by the caller
            self.errors.append(exc)
            self.connected.release()
        finally:
            for i in part:
                client = self.clients[i]
                if client.socket() is not None:
                    client.disconnect()
                    client.loop_write()
            sel.close()

    def wait_connected(self) -> None:
        for _ in self.threads:
            if not self.connected.acquire(timeout=self.timeout):
                raise TimeoutError("device clients did not connect in time")
        self._check()
        bad = [(self.creds[i][0], str(rc)) for i, rc in enumerate(self.connack) if _failed(rc)]
        if bad:
            raise RuntimeError(f"{len(bad)} device clients were refused, e.g. {bad[:3]}")

    def publish(self) -> None:
        """Every client publishes ``m`` messages to its telemetry topic, round robin; returns once all are acked."""
        self.go.set()
        deadline = time.monotonic() + self.timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._check()

    def _check(self) -> None:
        if self.errors:
            raise RuntimeError(f"device clients failed: {self.errors[0]!r}") from self.errors[0]

    def stop(self) -> None:
        self.stopping.set()
        self.go.set()
        for t in self.threads:
            t.join(self.timeout)


def end_session(broker: EmbeddedBroker, client_id: str, auth: tuple[str, str]) -> None:
    """Discard the persistent session ``client_id`` left in the broker (a clean start, then a disconnect).

    The stopped controller's session (7 days' expiry) would otherwise keep its subscriptions, and the
    secured broker would queue (and write to its persistence file) every message of the fan-in for it."""
    connack: list[Any] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.reconnect_delay_set(30, 60)
    c.username_pw_set(*auth)
    c.on_connect = lambda _c, _u, _f, rc, _p: connack.append(rc)
    c.connect(broker.host, broker.port, keepalive=60, clean_start=True)  # session expiry 0: gone on disconnect
    c.loop_start()
    try:
        wait_for(lambda: connack, 30, interval=0.01)
        if _failed(connack[0]):
            raise RuntimeError(f"could not end the session of {client_id}: {connack[0]}")
    finally:
        c.disconnect()
        c.loop_stop()


def fan_in(broker: EmbeddedBroker, creds: Credentials, sub_auth: tuple[str, str] | None, m: int) -> dict[str, Any]:
    """One trial: every device publishes ``m`` messages; the subscriber counts them."""
    n = len(creds)
    total = n * m
    body = payload()
    timeout = 60 + total / 200  # generous: a deadline, not an expectation
    sub = Subscriber(broker, sub_auth, total, timeout)
    fleet: Fleet | None = None
    try:
        fleet = Fleet(broker, creds, m, body, timeout)
        fleet.wait_connected()
        pid = broker.pid or 0
        cpu0 = cpu_seconds(pid)
        start = time.time()
        fleet.publish()
        acked = time.time()
        if sum(fleet.acked) < total:
            raise RuntimeError(f"only {sum(fleet.acked)} of {total} publishes were acknowledged")
        got = sub.result()
        cpu1 = cpu_seconds(pid)
        per_topic: dict[str, int] = got["per_topic"]
        lost = sum(max(0, m - per_topic.get(topics.telemetry(d), 0)) for d, _ in creds)
        seconds = max(got["last"] - start, 1e-9)
        return {
            "msgs_per_s": min(got["received"], total) / seconds,
            "seconds": seconds,
            "publisher_acked_s": acked - start,
            "received": got["received"],
            "lost": lost,
            "refused": sum(fleet.refused),
            "broker_cpu_s": cpu1 - cpu0,
            "broker_busy": (cpu1 - cpu0) / seconds,
            "subscriber_cpu_s": got["cpu_s"],
            "payload_bytes": len(body),
        }
    finally:
        if fleet is not None:
            fleet.stop()
        sub.kill()


def run(quick: bool = False) -> dict[str, Any]:
    n, m = (20, 50) if quick else (200, 200)
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-security-") as tmp_name:
        tmp = Path(tmp_name)
        dynsec_file, secret = dynsec.prepare(tmp / "secured")
        # the subscriber may fall a whole trial behind the devices: the broker must queue it, not drop it
        # (a later max_queued_messages line overrides the embedded configuration's 20000)
        extra = f"max_queued_messages {n * m + 1000}"
        anonymous = EmbeddedBroker(tmp / "anonymous", engine="mosquitto", extra_config=extra)
        secured = EmbeddedBroker(tmp / "secured", engine="mosquitto", extra_config=extra, dynsec_file=dynsec_file)
        try:
            anonymous.start()
            secured.start()
            enrolled = enroll(secured, secret, tmp / "controller", n)
            end_session(secured, CONTROLLER_CLIENT_ID, (dynsec.CONTROLLER_USER, secret))
            creds: Credentials = enrolled["credentials"]
            anon_creds: Credentials = [(d, None) for d, _ in creds]
            trials: dict[str, list[dict[str, Any]]] = {"anonymous": [], "acl": []}
            for _ in range(TRIALS):
                trials["anonymous"].append(fan_in(anonymous, anon_creds, None, m))
                trials["acl"].append(fan_in(secured, creds, (dynsec.CONTROLLER_USER, secret), m))
        finally:
            secured.stop()
            anonymous.stop()

    def med(kind: str, key: str) -> float:
        return float(statistics.median(t[key] for t in trials[kind]))

    total = n * m
    anon_rate, acl_rate = med("anonymous", "msgs_per_s"), med("acl", "msgs_per_s")
    anon_cpu, acl_cpu = med("anonymous", "broker_cpu_s"), med("acl", "broker_cpu_s")
    every = trials["anonymous"] + trials["acl"]
    return {
        "devices": n,
        "messages_per_device": m,
        "messages_per_trial": total,
        "trials_per_broker": TRIALS,
        "qos": 1,
        "payload_bytes": every[0]["payload_bytes"],
        "broker": "mosquitto",
        "enrollments": n,
        "enrollments_done": enrolled["done"],
        "enroll_per_s": round(enrolled["per_s"], 1),
        "enroll_p50_ms": round(enrolled["p50_ms"], 2),
        "enroll_p95_ms": round(enrolled["p95_ms"], 2),
        "enroll_first_half_p50_ms": round(enrolled["first_half_p50_ms"], 2),
        "enroll_second_half_p50_ms": round(enrolled["second_half_p50_ms"], 2),
        "anonymous_msgs_per_s": round(anon_rate),
        "acl_msgs_per_s": round(acl_rate),
        "acl_vs_anonymous_ratio": round(acl_rate / anon_rate, 3),
        "anonymous_msgs_per_s_trials": [round(t["msgs_per_s"]) for t in trials["anonymous"]],
        "acl_msgs_per_s_trials": [round(t["msgs_per_s"]) for t in trials["acl"]],
        "received": sum(t["received"] for t in every),
        "sent": total * len(every),
        "lost": sum(t["lost"] for t in every),
        "refused": sum(t["refused"] for t in every),
        "broker_cpu_s_anonymous": round(anon_cpu, 2),
        "broker_cpu_s_acl": round(acl_cpu, 2),
        "broker_cpu_us_per_msg_anonymous": round(anon_cpu / total * 1e6, 1),
        "broker_cpu_us_per_msg_acl": round(acl_cpu / total * 1e6, 1),
        "broker_cpu_acl_vs_anonymous_ratio": round(acl_cpu / anon_cpu, 3) if anon_cpu else None,
        # the broker's CPU over the fan-in's wall time: well under 1 means the clients set the pace
        "broker_busy_anonymous": round(med("anonymous", "broker_busy"), 2),
        "broker_busy_acl": round(med("acl", "broker_busy"), 2),
        "subscriber_cpu_s_anonymous": round(med("anonymous", "subscriber_cpu_s"), 2),
        "subscriber_cpu_s_acl": round(med("acl", "subscriber_cpu_s"), 2),
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["subscriber"]:
        subscriber_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m benchmarks.security subscriber ... (or: python -m benchmarks security)")

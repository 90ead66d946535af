"""Values no device can send are not stored (issue 20): the controller (``slmfleet up``) behind a real broker,
and an MQTT client that says it is a device. Impossible values are refused or clamped and counted, clocks far
off the controller's are flagged and the receive time stored, reports of deployments that do not exist are
dropped."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from controller.broker.embedded import EmbeddedBroker
from tests.e2e.fleet import Fleet
from tests.helpers import RawMqtt, metric_value, wait_until
from tests.security import payloads
from wire import codec, topics

pytestmark = pytest.mark.slow
YEAR_2984 = 32_000_000_000.0
DEVICE = "vb-1"


def message(obj: dict[str, object]) -> bytes:
    return json.dumps(obj).encode()


def test_impossible_values_are_refused_clamped_or_flagged(tmp_path: Path, private_broker: EmbeddedBroker) -> None:
    fleet = Fleet(tmp_path, private_broker.url)
    try:
        ctl = fleet.start_controller()
        device = RawMqtt(private_broker.port, DEVICE)
        birth = json.loads(codec.encode(payloads.birth()))  # 4 cores, 2 GiB
        device.publish(topics.state(DEVICE), message(birth), retain=True)
        wait_until(lambda: ctl.get(f"/api/v1/devices/{DEVICE}").status_code == 200, 20, what="the birth stored")

        good = json.loads(codec.encode(payloads.telemetry(seq=1)))
        sent = [
            {**good, "seq": 2, "cpu_percent": 1.7e308},  # refused: beyond any device
            {**good, "seq": 3, "cpu_percent": 950.0, "rss_bytes": 5 * 2**30},  # clamped: 4 cores, 2 GiB
            {**good, "seq": 4, "ts": YEAR_2984},  # flagged: stored at receive time
            {**good, "seq": 5, "ts": 1.0},  # 1970: a device without a real-time clock
            {**good, "seq": 6, "temperature_c": -400.0},  # refused: below absolute zero
        ]
        before = time.time()
        for body in sent:
            device.publish(topics.telemetry(DEVICE), message(body))
        long_model = {**birth, "hardware": {**birth["hardware"], "cpu_model": "x" * 60_000}}
        device.publish(topics.state(DEVICE), message(long_model), retain=True)  # refused: a 60 KB CPU model
        ghost = {"v": 1, "ts": time.time(), "seq": 9, "artifact_id": "ab" * 32}
        device.publish(
            topics.events(DEVICE),
            message({**ghost, "type": "deployment", "deployment_id": "no-such-dep", "state": "failed"}),
        )
        device.publish(
            topics.events(DEVICE),
            message({**ghost, "type": "chunks", "deployment_id": "no-such-dep", "ranges": [[0, 3]]}),
        )
        device.publish(topics.telemetry(DEVICE), message({**good, "seq": 7}))  # the sentinel, last

        def rows() -> list[dict[str, object]]:
            return ctl.get(f"/api/v1/devices/{DEVICE}/telemetry").json()  # type: ignore[no-any-return]

        wait_until(lambda: any(r["seq"] == 7 for r in rows()), 20, what="the sentinel stored")
        by_seq = {r["seq"]: r for r in rows()}
        assert sorted(by_seq) == [3, 4, 5, 7], "1.7e308 % CPU and -400 degrees are not stored"
        assert by_seq[3]["cpu_percent"] == 400.0 and by_seq[3]["rss_bytes"] == 2 * 2**30
        for seq in (4, 5):
            row = by_seq[seq]
            stored = datetime.fromisoformat(str(row["ts"])).timestamp()
            assert abs(stored - before) < 120, row  # the receive time, not the year 2984 or 1970
            assert abs(row["data"]["clock_skew_s"]) > 1e6  # type: ignore[index]
        assert ctl.get(f"/api/v1/devices/{DEVICE}").json()["hardware"].get("cpu_model") is None
        events = ctl.get(f"/api/v1/devices/{DEVICE}/events").json()
        assert [e for e in events if "no-such-dep" in json.dumps(e)] == []

        metrics = ctl.get("/metrics").text
        invalid = "slmfleet_invalid_payloads_total"
        assert metric_value(metrics, invalid, {"channel": "telemetry", "reason": "schema"}) == 2
        assert metric_value(metrics, invalid, {"channel": "state", "reason": "schema"}) == 1
        assert metric_value(metrics, invalid, {"channel": "events", "reason": "unknown_deployment"}) == 2
        assert metric_value(metrics, "slmfleet_values_clamped_total", {"field": "cpu_percent"}) == 1
        assert metric_value(metrics, "slmfleet_values_clamped_total", {"field": "rss_bytes"}) == 1
        assert metric_value(metrics, "slmfleet_clock_skew_total", {"channel": "telemetry"}) == 2
        device.close()
    finally:
        fleet.stop()

"""Webhooks against a real HTTP receiver on a free loopback port: signed bodies (verified here by hand and
with the Standard Webhooks reference library), retries with backoff after a 500, the delivery log, events
from real rollouts, deployments and devices, restarts, slow receivers, and who may manage them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError

from controller.auth.tokens import Role
from controller.broker.embedded import EmbeddedBroker, free_port
from controller.notify import events, signing
from controller.notify.sender import SenderSettings, retry_delay
from tests.conftest import LiveController
from tests.controller import devices_util as du
from tests.helpers import RawMqtt, wait_until
from tests.notify.receiver import Receiver
from tests.rollouts.test_rollouts import fast_waves, rollout, until_state

FAST = {"webhook_retry_base_s": 0.3, "webhook_retry_max_s": 2.0, "webhook_timeout_s": 2.0}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def ctl(private_broker: EmbeddedBroker, make_controller: Callable[..., LiveController]) -> LiveController:
    return make_controller(private_broker, chunk_size=65536, rollout_step_s=0.2, **FAST)


def add_webhook(ctl: LiveController, url: str, events_: list[str] | None = None, name: str = "ops") -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "url": url}
    if events_ is not None:
        body["events"] = events_
    r = ctl.client.post("/api/v1/webhooks", json=body, headers=ctl.auth)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def verified(secret: str, request: Any) -> dict[str, Any]:
    """The receiver's check, twice: by hand as the README shows it, and with the reference library."""
    h = request.headers
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + request.body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert expected in h["webhook-signature"].split(" "), "signature does not verify"
    assert abs(time.time() - int(h["webhook-timestamp"])) < 300, "timestamp too far from now"
    payload = StandardWebhook(secret).verify(request.body, request.headers)
    assert payload == json.loads(request.body)
    return payload  # type: ignore[no-any-return]


def deliveries(ctl: LiveController, webhook_id: int, **params: Any) -> list[dict[str, Any]]:
    r = ctl.client.get(f"/api/v1/webhooks/{webhook_id}/deliveries", params=params, headers=ctl.auth)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


# ------------------------------------------------------------------- units --


def test_signatures_follow_standard_webhooks() -> None:
    secret = signing.new_secret()
    body = events.body("msg_1", "ping", {"x": 1})
    header = signing.sign(secret, "msg_1", 1_700_000_000, body)
    # the reference implementation signs the same bytes the same way
    reference = StandardWebhook(secret).sign("msg_1", datetime.fromtimestamp(1_700_000_000, UTC), body)
    assert header == reference
    assert signing.verify(secret, "msg_1", 1_700_000_000, body, f"v1,bm9wZQ== {header}")
    assert not signing.verify(secret, "msg_1", 1_700_000_001, body, header)  # another timestamp: a replay
    assert not signing.verify(signing.new_secret(), "msg_1", 1_700_000_000, body, header)
    short = "whsec_" + base64.b64encode(b"short").decode()
    for bad, why in (("nope", "whsec_"), ("whsec_***", "base64"), (short, "24-64")):
        with pytest.raises(ValueError, match=why):
            signing.key_of(bad)


def test_retries_back_off_four_times_longer_each_time_up_to_the_cap() -> None:
    s = SenderSettings(retry_base_s=10, retry_max_s=3600)
    delays = [retry_delay(n, s) for n in range(1, 8)]
    for n, d in enumerate(delays, start=1):
        want = min(10 * 4 ** (n - 1), 3600)
        assert 0.8 * want <= d <= 1.2 * want, (n, d)
    assert retry_delay(1, s, retry_after=120) >= 120  # a Retry-After within the cap is honoured
    assert retry_delay(1, s, retry_after=10**6) <= 3600 * 1.2


def test_event_patterns_are_checked() -> None:
    assert events.check_patterns(["rollout.*", "rollout.*", " "]) == ["rollout.*"]
    assert events.check_patterns([]) == ["*"]
    with pytest.raises(ValueError, match="matches no event"):
        events.check_patterns(["rollout.abortd"])
    assert events.matches(["rollout.*"], "rollout.aborting") and not events.matches(["rollout.*"], "device.offline")


# ------------------------------------------------------------- end to end --


def test_an_aborted_rollout_is_told_signed_and_retried_after_a_500(  # type: ignore[no-untyped-def]
    ctl: LiveController, fleet, receiver: Receiver
) -> None:
    receiver.script = [500]  # the first request fails, every later one succeeds
    hook = add_webhook(ctl, receiver.url, ["rollout.*", "deployment.failed"])
    secret = hook["secret"]
    assert secret.startswith("whsec_")
    peers = fleet(4, behaviour={0: "fail_load"}, labels={0: {"tier": "canary"}})
    waves = [{"selector": "tier=canary", "bake_s": 0.5, "failure_threshold": "1"}, *fast_waves("100%")]
    r = rollout(ctl, waves=waves)
    until_state(ctl, r["id"], "aborted", timeout=60)
    wait_until(lambda: receiver.requests("rollout.aborted"), 30, what="rollout.aborted delivered")
    wait_until(lambda: receiver.requests("deployment.failed"), 30, what="deployment.failed delivered")

    aborting = wait_until(lambda: (x := receiver.requests("rollout.aborting")) and len(x) >= 2 and x, 10)
    # the first attempt got a 500 and was sent again, the same message (id, body) with a new signature
    assert [a.status for a in aborting] == [500, 200], [a.status for a in aborting]
    assert aborting[0].headers["webhook-id"] == aborting[1].headers["webhook-id"]
    assert aborting[0].body == aborting[1].body
    assert [a.headers["x-slmfleet-attempt"] for a in aborting] == ["1", "2"]
    assert aborting[1].at - aborting[0].at >= 0.3 * 0.8  # waited the backoff
    payload = verified(secret, aborting[1])
    assert payload["type"] == "rollout.aborting"
    data = payload["data"]["rollout"]
    assert data["id"] == r["id"] and data["model"] == "pump" and data["version"] == 2
    assert data["state"] == "aborting" and "failed in wave 1" in data["reason"] and data["actor"] == "system"
    aborted = verified(secret, receiver.requests("rollout.aborted")[-1])
    assert aborted["data"]["rollout"]["previous_state"] == "aborting"
    failed = verified(secret, receiver.requests("deployment.failed")[-1])["data"]["deployment"]
    assert failed["rollout_id"] == r["id"] and failed["wave"] == 1
    assert any(f["device_id"] == peers[0].device_id and "out of memory" in f["reason"] for f in failed["failed"])
    # only what was asked for: no device or ping events
    assert {req.headers["x-slmfleet-event"] for req in receiver} <= {
        "rollout.aborting",
        "rollout.aborted",
        "deployment.failed",
    }

    # the delivery log says the same
    log = deliveries(ctl, hook["id"], status="delivered")
    first = next(d for d in log if d["event_type"] == "rollout.aborting")
    assert first["attempts"] == 2 and [h["status"] for h in first["history"]] == [500, 200]
    assert "HTTP 500" in first["history"][0]["error"]
    detail = ctl.client.get(f"/api/v1/webhook-deliveries/{first['id']}", headers=ctl.auth).json()
    assert detail["body"] == payload
    listed = ctl.client.get("/api/v1/webhooks", headers=ctl.auth).json()
    assert listed[0]["delivered"] >= 3 and listed[0]["pending"] == 0 and "secret" not in listed[0]


def test_pending_deliveries_survive_a_restart(
    private_broker: EmbeddedBroker, make_controller: Callable[..., LiveController], tmp_path: Any
) -> None:
    data_dir = tmp_path / "ctl"
    port = free_port()  # nobody listens there yet: connections are refused
    first = make_controller(private_broker, data_dir=data_dir, webhook_retry_base_s=0.2, webhook_retry_max_s=0.5)
    hook = add_webhook(first, f"http://127.0.0.1:{port}/hook")
    r = first.client.post(f"/api/v1/webhooks/{hook['id']}/test", headers=first.auth)
    assert r.status_code == 202, r.text
    wait_until(lambda: deliveries(first, hook["id"])[0]["attempts"] >= 2, 15, what="failed attempts")
    pending = deliveries(first, hook["id"])[0]
    assert pending["status"] == "pending" and "Connect" in pending["last_error"]
    first.client.__exit__(None, None, None)  # the controller stops with the delivery still pending
    down = Receiver(port=port).start()
    try:
        second = make_controller(private_broker, data_dir=data_dir, webhook_retry_base_s=0.2, webhook_retry_max_s=0.5)
        wait_until(lambda: down.requests("ping"), 15, what="the pending ping delivered after the restart")
        done = wait_until(
            lambda: (d := deliveries(second, hook["id"])[0])["status"] == "delivered" and d, 10, what="logged"
        )
        assert done["attempts"] >= 3 and done["event_id"] == pending["event_id"]
        verified(hook["secret"], down.requests("ping")[0])
    finally:
        down.stop()


def test_devices_offline_too_long_are_told_once_and_when_back(
    private_broker: EmbeddedBroker, make_controller: Callable[..., LiveController], receiver: Receiver
) -> None:
    ctl = make_controller(private_broker, notify_offline_after_s=1.0, sweep_interval_s=0.2)
    hook = add_webhook(ctl, receiver.url, ["device.*"])
    raw = RawMqtt(private_broker.port, "offline-sim")
    try:
        for device_id in ("pump-1", "pump-2", "pump-3"):
            raw.publish(*du.birth(device_id, labels={"site": "oslo"}))
        wait_until(lambda: ctl.client.get("/api/v1/devices").json()["total"] == 3, 10)
        raw.publish(*du.offline("pump-1"))
        raw.publish(*du.offline("pump-2", reason="shutdown"))
        got = wait_until(lambda: receiver.requests("device.offline"), 20, what="device.offline")
        payload = verified(hook["secret"], got[0])["data"]
        assert payload["count"] == 2 and sorted(d["id"] for d in payload["devices"]) == ["pump-1", "pump-2"]
        assert {d["reason"] for d in payload["devices"]} == {"will", "shutdown"}
        assert payload["devices"][0]["labels"] == {"site": "oslo"}
        offline_since = payload["devices"][0]["offline_since"]
        assert offline_since.endswith("Z")
        time.sleep(0)  # nothing to wait for: the next checks must not tell again
        wait_until(lambda: ctl.runtime.triggers.check_devices() == (0, 0), 5)
        assert len(receiver.requests("device.offline")) == 1
        raw.publish(*du.birth("pump-1"))
        back = wait_until(lambda: receiver.requests("device.online"), 20, what="device.online")
        online = verified(hook["secret"], back[0])["data"]
        assert [d["id"] for d in online["devices"]] == ["pump-1"]
        assert len(receiver.requests("device.offline")) == 1
    finally:
        raw.close()


def test_a_slow_receiver_holds_one_worker_and_nothing_else(
    private_broker: EmbeddedBroker, make_controller: Callable[..., LiveController]
) -> None:
    slow = Receiver(default=(200, 30.0)).start()  # answers after 30 s (beyond the timeout)
    fast = Receiver().start()
    try:
        ctl = make_controller(
            private_broker, webhook_timeout_s=1.5, webhook_concurrency=2, webhook_retry_base_s=60, **{}
        )
        slow_hook = add_webhook(ctl, slow.url, name="slow")
        fast_hook = add_webhook(ctl, fast.url, name="fast")
        for _ in range(10):
            assert ctl.client.post(f"/api/v1/webhooks/{slow_hook['id']}/test", headers=ctl.auth).status_code == 202
            assert ctl.client.post(f"/api/v1/webhooks/{fast_hook['id']}/test", headers=ctl.auth).status_code == 202
        sender = ctl.runtime.webhook_sender
        peak = 0

        def fast_done() -> bool:
            nonlocal peak
            peak = max(peak, sender.in_flight)
            return len(fast.requests("ping")) == 10

        wait_until(fast_done, 20, interval=0.005, what="all ten pings to the fast receiver")
        assert peak <= 2  # never more than the pool, one of which the slow receiver holds
        assert len(slow.requests("ping")) <= 2  # one at a time, each given up after the timeout
        slow_log = wait_until(
            lambda: [d for d in deliveries(ctl, slow_hook["id"]) if d["attempts"]], 10, what="a timed-out attempt"
        )
        assert "no answer within 1.5 s" in slow_log[0]["last_error"]
        assert all(d["status"] == "pending" for d in deliveries(ctl, slow_hook["id"]))  # waiting, in the database
    finally:
        slow.stop()
        fast.stop()


def test_only_admins_manage_webhooks_and_bad_input_is_one_line(ctl: LiveController, receiver: Receiver) -> None:
    c = ctl.client
    operator = {"Authorization": f"Bearer {ctl.token_for(Role.OPERATOR, 'op')}"}
    assert c.get("/api/v1/webhooks").status_code == 401
    assert c.get("/api/v1/webhooks", headers=operator).status_code == 403
    assert c.post("/api/v1/webhooks", json={"name": "x", "url": receiver.url}, headers=operator).status_code == 403
    for body, where in (
        ({"name": "x", "url": "ftp://host/x"}, "http(s)://host"),
        ({"name": "x", "url": receiver.url, "events": ["rollout.abortd"]}, "matches no event"),
        ({"name": "x", "url": receiver.url, "secret": "hunter2"}, "whsec_"),
        ({"name": "bad name", "url": receiver.url}, "name"),
    ):
        r = c.post("/api/v1/webhooks", json=body, headers=ctl.auth)
        assert r.status_code == 422 and where in r.text, (body, r.text)
    mine = signing.new_secret()
    hook = add_webhook(ctl, receiver.url, ["ping"], name="pager")
    assert c.post("/api/v1/webhooks", json={"name": "pager", "url": receiver.url}, headers=ctl.auth).status_code == 409
    r = c.patch(f"/api/v1/webhooks/{hook['id']}", json={"secret": mine, "enabled": False}, headers=ctl.auth)
    assert r.status_code == 200 and r.json()["enabled"] is False and "secret" not in r.json()
    assert c.post(f"/api/v1/webhooks/{hook['id']}/test", headers=ctl.auth).status_code == 409  # disabled
    c.patch(f"/api/v1/webhooks/{hook['id']}", json={"enabled": True}, headers=ctl.auth)
    assert c.post(f"/api/v1/webhooks/{hook['id']}/test", headers=ctl.auth).status_code == 202
    got = wait_until(lambda: receiver.requests("ping"), 10, what="ping")
    verified(mine, got[0])  # signed with the secret the admin set
    with pytest.raises(WebhookVerificationError):
        StandardWebhook(hook["secret"]).verify(got[0].body, got[0].headers)  # not with the old one
    rotated = c.patch(f"/api/v1/webhooks/{hook['id']}", json={"rotate_secret": True}, headers=ctl.auth).json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != mine
    actions = [a for a in ctl.client.get("/api/v1/webhooks", headers=ctl.auth).json()]
    assert actions[0]["delivered"] == 1
    assert c.delete(f"/api/v1/webhooks/{hook['id']}", headers=ctl.auth).status_code == 204
    assert c.get(f"/api/v1/webhooks/{hook['id']}/deliveries", headers=ctl.auth).status_code == 404
    assert c.get("/api/v1/webhook-deliveries", headers=ctl.auth).json() == []  # the log went with it

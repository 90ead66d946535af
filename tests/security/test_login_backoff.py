"""Dashboard logins: failures slow down the address that guesses, never the account (nobody can lock the admin
out); over real HTTP from several loopback addresses, and the back-off schedule with a controllable clock."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from controller.web.sessions import LoginBackoff
from tests.helpers import metric_value
from tests.security.conftest import LiveServer
from tests.web.support import PASSWORDS, add_users, login


def test_an_attacker_slows_down_only_itself(live_server: Callable[..., LiveServer]) -> None:
    live = live_server()
    add_users(live.runtime.engine, ("adam",))
    attacker = httpx.Client(base_url=live.url, transport=httpx.HTTPTransport(local_address="127.0.0.9"), timeout=30)
    admin = httpx.Client(base_url=live.url, transport=httpx.HTTPTransport(local_address="127.0.0.1"), timeout=30)
    with attacker, admin:
        answers = [login(attacker, "adam", f"guess-number-{i}").status_code for i in range(8)]
        # 3 free failures, then each failure makes the attacker wait before its next try (not counted as a guess)
        assert answers[:4] == [401] * 4 and 429 in answers[4:], answers
        held = login(attacker, "adam")  # even the right password waits: the guesser learns nothing
        assert held.status_code == 429 and "try again in" in held.text and int(held.headers["Retry-After"]) >= 1
        # the admin, from an address that did not fail, logs in at once with the right password
        ok = login(admin, "adam", PASSWORDS["adam"])
        assert ok.status_code == 303 and ok.headers["location"] == "/"
    metrics = httpx.get(live.url + "/metrics", timeout=10).text
    assert metric_value(metrics, "slmfleet_dashboard_logins_throttled_total", {"scope": "user"}) >= 1


def test_the_back_off_doubles_per_failure_is_capped_and_forgotten() -> None:
    now = [0.0]
    backoff = LoginBackoff(pair_free=3, source_free=10, base_s=1.0, max_s=8.0, forget_s=100.0, clock=lambda: now[0])
    for _ in range(3):
        backoff.failed("10.0.0.1", "admin")
    assert backoff.wait("10.0.0.1", "admin") == (0.0, "user")  # the free ones
    waits = []
    for _ in range(6):
        backoff.failed("10.0.0.1", "Admin")  # names are case-insensitive, as logins are
        waits.append(backoff.wait("10.0.0.1", "admin")[0])
        now[0] += waits[-1]  # the attacker waits exactly as long as it is told
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # doubling, capped at max_s
    assert backoff.wait("10.0.0.2", "admin") == (0.0, "user")  # another address: no wait at all
    now[0] += 100.0
    assert backoff.wait("10.0.0.1", "admin") == (0.0, "user")  # forgotten after forget_s without failures


def test_one_address_spraying_many_names_waits_for_all_of_them() -> None:
    now = [0.0]
    backoff = LoginBackoff(pair_free=3, source_free=5, base_s=2.0, clock=lambda: now[0])
    for i in range(6):
        backoff.failed("10.0.0.1", f"user-{i}")
    assert backoff.wait("10.0.0.1", "someone-else") == (2.0, "source")
    assert backoff.wait("10.0.0.2", "someone-else") == (0.0, "user")
    backoff.succeeded("10.0.0.1", "user-0")  # a success clears its own pair, not what the address sprayed
    assert backoff.wait("10.0.0.1", "user-0")[0] == 2.0


def test_the_records_are_bounded() -> None:
    backoff = LoginBackoff(max_keys=50)
    for i in range(500):
        backoff.failed(f"10.0.{i // 250}.{i % 250}", "admin")
    assert len(backoff._pairs) == len(backoff._sources) == 50

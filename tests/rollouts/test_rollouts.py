"""Rollouts against device peers on a real broker: waves, gates, shadow, windows, approvals, restarts."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from controller.auth.tokens import Role
from controller.rollouts.machine import TRANSITIONS, RolloutEvent, RolloutState
from tests.helpers import wait_until
from tests.registry.tiny_models import anomaly_model
from tests.rollouts.autopeer import AutoPeer
from wire.messages import Commit, InstalledModel

FAST_GATES = {
    "min_samples": 100,
    "deadline_s": 20,
    "error_rate_max": 0.05,
    "p95_latency_ratio_max": 1.5,
    "rss_ratio_max": 1.5,
    "shadow_agreement_min": 0.9,
    "warmup_s": 0,  # the peers serve at full speed from the first inference
}


def fast_waves(*untils: str, bake: float = 0.6, **kw: Any) -> list[dict[str, Any]]:
    return [{"until": u, "bake_s": bake, "device_timeout_s": 60, "failure_threshold": "1", **kw} for u in untils]


@pytest.fixture
def ctl(private_broker, make_controller):  # type: ignore[no-untyped-def]
    return make_controller(private_broker, chunk_size=65536, rollout_step_s=0.2)


@pytest.fixture
def versions(ctl, tmp_path: Path) -> dict[int, dict]:  # type: ignore[no-untyped-def]
    path, threshold = anomaly_model(tmp_path / "m.onnx")
    options = {"task": "anomaly", "anomaly": {"threshold": threshold, "higher_is_anomalous": False, "output": "scores"}}
    out = {}
    for _ in range(2):
        r = ctl.client.post(
            "/api/v1/models/pump/versions",
            files=[("file", ("m.onnx", path.read_bytes()))],
            data={"options": json.dumps(options)},
            headers=ctl.auth,
        )
        assert r.status_code == 201, r.text
        out[r.json()["number"]] = r.json()
    return out


@pytest.fixture
def fleet(ctl, versions):  # type: ignore[no-untyped-def]
    key = ctl.client.get("/api/v1/signing-key").json()["public_key_pem"]
    v1 = versions[1]["variants"][0]
    serving = InstalledModel(model="pump", version=1, variant="fp32", artifact=v1["artifact_id"])
    made: list[AutoPeer] = []

    def make(
        n: int,
        behaviour: dict[int, str] | None = None,
        labels: dict[int, dict[str, str]] | None = None,
        prefix: str = "dev",
    ) -> list[AutoPeer]:
        peers = []
        for i in range(n):
            peer = AutoPeer(
                ctl.broker.port,
                f"{prefix}-{i:02d}",
                key,
                serving=serving,
                behaviour=(behaviour or {}).get(i, "ok"),  # type: ignore[arg-type]
                labels={"fleet": "pumps", **(labels or {}).get(i, {})},
            )
            peers.append(peer)
            made.append(peer)
        wait_until(
            lambda: ctl.client.get("/api/v1/devices", params={"selector": "fleet=pumps"}).json()["total"] >= len(made),
            15,
        )
        # devices have been serving the previous version for a while: that is the gates' baseline
        wait_until(
            lambda: all(len(ctl.client.get(f"/api/v1/devices/{p.device_id}/telemetry").json()) >= 4 for p in peers),
            30,
            what="baseline telemetry",
        )
        return peers

    yield make
    for p in made:
        p.close()


def rollout(ctl, **body: Any) -> dict:  # type: ignore[no-untyped-def]
    r = ctl.client.post(
        "/api/v1/rollouts",
        json={"model": "pump", "version": 2, "selector": "fleet=pumps", "gates": FAST_GATES, **body},
        headers=ctl.auth,
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def get(ctl, rid: str) -> dict:  # type: ignore[no-untyped-def]
    return ctl.client.get(f"/api/v1/rollouts/{rid}").json()  # type: ignore[no-any-return]


def until_state(ctl, rid: str, *states: str, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
    return wait_until(
        lambda: (r := get(ctl, rid))["state"] in states and r,
        timeout,  # type: ignore[return-value]
        what=f"rollout in {states}",
    )


def test_a_good_model_goes_through_every_wave(ctl, fleet) -> None:  # type: ignore[no-untyped-def]
    peers = fleet(6)
    r = rollout(ctl, waves=fast_waves("1", "50%", "100%"))
    assert [w["devices"] for w in r["waves"]] == [1, 2, 3]
    done = until_state(ctl, r["id"], "completed", "aborted", timeout=90)
    assert done["state"] == "completed", done["reason"]
    assert all(p.serving is not None and p.serving.version == 2 for p in peers)
    path = [(t["from_state"], t["to_state"]) for t in done["transitions"]]
    assert path[:4] == [("", "pending"), ("pending", "deploying"), ("deploying", "baking"), ("baking", "gating")]
    assert path[-1] == ("gating", "completed")
    assert sum(1 for t in done["transitions"] if t["to_state"] == "deploying") == 3
    gates = {g["name"]: g for g in done["gates"]}
    assert gates["error_rate"]["status"] == "pass" and gates["p95_latency_ratio"]["status"] == "pass"
    assert gates["p95_latency_ratio"]["samples"] >= 100
    # the decision's evidence: an interval at the stated confidence, within the threshold
    latency = gates["p95_latency_ratio"]
    assert latency["confidence"] == 0.95 and latency["low"] <= latency["value"] <= latency["high"] <= 1.5
    # every device serves v2 and its wave's gates passed: each one counts as succeeded
    assert [w["succeeded"] for w in done["waves"]] == [1, 2, 3]
    wait_until(
        lambda: all(any(isinstance(c, Commit) for c in p.commands) for p in peers),
        10,
        what="the new model confirmed on every device",
    )


def test_failures_in_the_canary_abort_and_every_touched_device_returns(ctl, fleet) -> None:  # type: ignore[no-untyped-def]
    # 30% of the fleet cannot load the model; the canary (tier=canary) includes one of them
    peers = fleet(
        10,
        behaviour={0: "fail_load", 4: "fail_load", 7: "fail_load"},
        labels={0: {"tier": "canary"}, 1: {"tier": "canary"}, 2: {"tier": "canary"}},
    )
    waves = [{"selector": "tier=canary", "bake_s": 0.5, "failure_threshold": "1"}, *fast_waves("100%")]
    r = rollout(ctl, waves=waves)
    done = until_state(ctl, r["id"], "aborted", timeout=60)
    assert done["wave_index"] == 0
    assert any(t["to_state"] == "aborting" and "failed in wave 1" in t["reason"] for t in done["transitions"])
    touched = peers[:3]
    # a device whose switch crossed the cancel on the wire is sent back too
    wait_until(
        lambda: all(p.serving is not None and p.serving.version == 1 for p in touched),
        20,
        what="every touched device back on version 1",
    )
    assert all(p.deploys == [] for p in peers[3:])  # later waves never started
    dep_url = f"/api/v1/deployments/{done['waves'][0]['deployment_id']}"
    states = wait_until(
        lambda: (
            (x := sorted(t["state"] for t in ctl.client.get(dep_url).json()["targets"]))
            and "rolling_back" not in x
            and x
        ),
        20,
    )
    assert states.count("failed") == 1 and set(states) <= {"failed", "rolled_back", "cancelled"}


def test_a_model_three_times_slower_fails_the_latency_gate(ctl, fleet) -> None:  # type: ignore[no-untyped-def]
    fleet(4, behaviour=dict.fromkeys(range(4), "slow"))
    r = rollout(ctl, waves=fast_waves("50%", "100%", bake=1.0))
    done = until_state(ctl, r["id"], "aborted", timeout=60)
    failing = [g for g in done["gates"] if g["status"] == "fail"]
    assert [g["name"] for g in failing] == ["p95_latency_ratio"]
    assert 2.5 < failing[0]["value"] < 3.5
    assert failing[0]["low"] > 1.5  # failed on evidence: even the lower bound is beyond the threshold
    # the devices that switched serve the new model, but its gates failed: none succeeded
    assert [w["succeeded"] for w in done["waves"]] == [0, 0]
    assert "p95_latency_ratio" in done["transitions"][-2]["reason"]


def test_shadow_disagreement_fails_before_any_device_switches(ctl, fleet) -> None:  # type: ignore[no-untyped-def]
    peers = fleet(4, behaviour=dict.fromkeys(range(4), "disagree"))
    r = rollout(ctl, waves=fast_waves("50%", "100%"), shadow={"sample_rate": 0.5, "min_samples": 50})
    done = until_state(ctl, r["id"], "aborted", timeout=60)
    assert any(
        t["from_state"] == "shadow_gating" and "shadow agreement 0.500" in t["reason"] for t in done["transitions"]
    )
    assert all(p.serving is not None and p.serving.version == 1 for p in peers)
    assert not any(t["to_state"] == "activating" for t in done["transitions"])


def test_shadow_agreement_then_switch(ctl, fleet) -> None:  # type: ignore[no-untyped-def]
    peers = fleet(2)
    r = rollout(ctl, waves=fast_waves("100%"), shadow={"sample_rate": 0.5, "min_samples": 50})
    done = until_state(ctl, r["id"], "completed", "aborted", timeout=60)
    assert done["state"] == "completed", done["reason"]
    states = [t["to_state"] for t in done["transitions"]]
    assert states.index("shadow_gating") < states.index("activating") < states.index("baking")
    assert all(p.serving.version == 2 for p in peers)  # type: ignore[union-attr]


def test_a_maintenance_window_holds_the_next_wave(ctl, fleet) -> None:  # type: ignore[no-untyped-def]
    peers = fleet(4)
    real = time.time()
    now = [real - (real % 3600) + 12 * 3600 + 60]  # a fake clock, one minute into hour H+12
    hour = time.gmtime(now[0]).tm_hour
    ctl.runtime.rollouts.clock = lambda: now[0]
    window = {"cron": f"0 {hour} * * *", "duration_s": 3600}  # one hour a day
    r = rollout(ctl, waves=fast_waves("1", "100%", bake=30.0), windows=[window])
    until_state(ctl, r["id"], "baking", timeout=60)  # inside the window: the canary went out
    now[0] += 2 * 3600  # the window closed while the canary baked
    held = until_state(ctl, r["id"], "waiting_window", timeout=60)
    assert held["wave_index"] == 1 and held["waves"][1]["deployment_id"] is None
    assert sum(1 for p in peers if p.deploys) == 1
    assert "next wave waits for a window" in held["reason"]
    now[0] += 22 * 3600  # the next day's window
    until_state(ctl, r["id"], "baking", timeout=60)
    now[0] += 40  # the bake time passes on the engine's clock
    done = until_state(ctl, r["id"], "completed", "aborted", timeout=60)
    assert done["state"] == "completed", done["reason"]
    assert all(p.deploys for p in peers)


def test_operator_controls_pause_resume_approve_abort(ctl, fleet) -> None:  # type: ignore[no-untyped-def]
    peers = fleet(4)
    r = rollout(ctl, waves=fast_waves("1", "2", "100%", require_approval=True))
    waiting = until_state(ctl, r["id"], "awaiting_approval", timeout=60)
    assert waiting["wave_index"] == 0
    viewer = {"Authorization": f"Bearer {ctl.token_for(Role.VIEWER)}"}
    assert ctl.client.post(f"/api/v1/rollouts/{r['id']}/approve", headers=viewer).status_code == 403
    paused = ctl.client.post(f"/api/v1/rollouts/{r['id']}/pause", headers=ctl.auth).json()
    assert paused["state"] == "paused" and paused["paused_from"] == "awaiting_approval"
    refused = ctl.client.post(f"/api/v1/rollouts/{r['id']}/approve", headers=ctl.auth)
    assert refused.status_code == 409 and "paused" in refused.json()["detail"]
    resumed = ctl.client.post(f"/api/v1/rollouts/{r['id']}/resume", headers=ctl.auth).json()
    assert resumed["state"] == "awaiting_approval"
    approved = ctl.client.post(
        f"/api/v1/rollouts/{r['id']}/approve", headers=ctl.auth, json={"reason": "canary looks good"}
    ).json()
    assert approved["wave_index"] == 1
    second = until_state(ctl, r["id"], "awaiting_approval", timeout=60)
    assert second["wave_index"] == 1
    touched = [p for p in peers if p.deploys]
    assert len(touched) == 2
    aborted = ctl.client.post(
        f"/api/v1/rollouts/{r['id']}/abort", headers=ctl.auth, json={"reason": "changed my mind"}
    ).json()
    assert aborted["state"] in ("aborting", "aborted")
    final = until_state(ctl, r["id"], "aborted", timeout=60)
    wait_until(lambda: all(p.serving.version == 1 for p in touched), 20)  # type: ignore[union-attr]
    assert all(not p.deploys for p in peers if p not in touched)
    reasons = [(t["actor"], t["reason"]) for t in final["transitions"]]
    assert ("test-admin", "canary looks good") in reasons and ("test-admin", "changed my mind") in reasons
    assert ctl.client.post(f"/api/v1/rollouts/{r['id']}/resume", headers=ctl.auth).status_code == 409


def test_late_devices_join_the_current_wave(ctl, fleet) -> None:  # type: ignore[no-untyped-def]
    fleet(2)
    r = rollout(ctl, waves=fast_waves("100%", bake=15.0))
    until_state(ctl, r["id"], "baking", "gating", timeout=60)
    late = fleet(1, prefix="late")[0]
    wait_until(lambda: late.deploys, 30, what="the late device got the deployment")
    done = until_state(ctl, r["id"], "completed", "aborted", timeout=60)
    assert done["state"] == "completed" and late.serving.version == 2  # type: ignore[union-attr]


def test_the_controller_restarts_in_the_middle_of_a_wave(private_broker, make_controller, fleet, ctl) -> None:  # type: ignore[no-untyped-def]
    peers = fleet(4)
    r = rollout(ctl, waves=fast_waves("1", "100%", bake=2.0))
    until_state(ctl, r["id"], "baking", timeout=60)
    ctl.client.__exit__(None, None, None)
    second = make_controller(
        private_broker, chunk_size=65536, rollout_step_s=0.2, data_dir=ctl.runtime.settings.data_dir
    )
    done = until_state(second, r["id"], "completed", "aborted", timeout=90)
    assert done["state"] == "completed", done["reason"]
    assert all(p.serving.version == 2 for p in peers)  # type: ignore[union-attr]


def test_the_transition_table_is_explicit_and_complete() -> None:
    for state in RolloutState:
        if state in (RolloutState.ABORTED, RolloutState.COMPLETED):
            assert not any(s == state for s, _ in TRANSITIONS)
        elif state != RolloutState.ABORTING:
            assert (state, RolloutEvent.ABORT) in TRANSITIONS, state
    assert TRANSITIONS[(RolloutState.GATING, RolloutEvent.GATES_FAILED)] == RolloutState.ABORTING
    assert TRANSITIONS[(RolloutState.SHADOW_GATING, RolloutEvent.SHADOW_PASSED)] == RolloutState.ACTIVATING


def test_bad_rollouts_are_refused(ctl, fleet) -> None:  # type: ignore[no-untyped-def]
    fleet(1)
    cases = [
        ({"selector": "fleet=none"}, 409, "no device matches"),  # valid, but the fleet's state refuses it
        ({"version": 7}, 404, "no version 7"),
        ({"windows": [{"cron": "every day", "duration_s": 60}]}, 422, "crontab"),
        # an unknown zone was stored, then failed every step of the rollout
        ({"windows": [{"cron": "0 2 * * *", "duration_s": 60, "timezone": "Mars/Olympus"}]}, 422, "time zone"),
        ({"waves": []}, 422, "waves"),
        ({"waves": [{"until": "ten"}]}, 422, "until"),
        ({"selector": "a=b=c"}, 422, "selector term"),
    ]
    for body, code, needle in cases:
        r = ctl.client.post(
            "/api/v1/rollouts",
            json={"model": "pump", "version": 2, "selector": "fleet=pumps", **body},
            headers=ctl.auth,
        )
        assert r.status_code == code, (body, r.text)
        assert needle in r.text, (body, r.text)


def _debug(ctl, rid):  # type: ignore[no-untyped-def]
    for t in get(ctl, rid)["transitions"]:
        print(t["from_state"], "->", t["to_state"], t["event"], t["reason"])
    print(get(ctl, rid)["gates"])


# ---------------------------------------------------------------- restarts --

RESTART_CASES = {
    # state to restart in: (rollout body additions, peer stages held until after the restart, end state)
    "pending": ({}, (), "completed"),
    "waiting_window": ({}, (), "completed"),
    "deploying": ({}, ("download",), "completed"),
    "shadow_gating": ({"shadow": {"sample_rate": 0.5, "min_samples": 50}}, ("shadow",), "completed"),
    "activating": ({"shadow": {"sample_rate": 0.5, "min_samples": 50}}, ("activate",), "completed"),
    "baking": ({}, (), "completed"),
    "gating": ({}, ("telemetry",), "completed"),
    "awaiting_approval": ({}, (), "completed"),
    "paused": ({}, (), "completed"),
    "aborting": ({}, ("rollback",), "aborted"),
}


@pytest.mark.slow
@pytest.mark.parametrize("state", list(RESTART_CASES))
def test_a_controller_restart_in_any_state_resumes(private_broker, make_controller, ctl, fleet, state: str) -> None:  # type: ignore[no-untyped-def]
    extra, held, end = RESTART_CASES[state]
    peers = fleet(2)
    offset = [0.0]  # the engine's clock runs with real time, shifted to reach a maintenance window

    def clock() -> float:
        return time.time() + offset[0]

    ctl.runtime.rollouts.clock = clock
    body: dict[str, Any] = {
        **extra,
        "waves": fast_waves(
            "1", "100%", bake=0.5 if state != "baking" else 5.0, require_approval=state == "awaiting_approval"
        ),
    }
    if state == "pending":
        body["start_at"] = datetime.fromtimestamp(time.time() + 4, UTC).isoformat()
    if state == "waiting_window":
        body["windows"] = [{"cron": f"0 {(time.gmtime().tm_hour + 12) % 24} * * *", "duration_s": 3600}]
    if state == "gating":
        body["gates"] = {**FAST_GATES, "min_samples": 2000, "deadline_s": 120}
    for p in peers:
        p.hold(*held)
    r = rollout(ctl, **body)
    if state == "paused":
        until_state(ctl, r["id"], "baking", "gating", "deploying", timeout=30)
        ctl.client.post(f"/api/v1/rollouts/{r['id']}/pause", headers=ctl.auth)
    if state == "aborting":
        until_state(ctl, r["id"], "baking", "gating", timeout=30)
        ctl.client.post(f"/api/v1/rollouts/{r['id']}/abort", headers=ctl.auth)
    before = until_state(ctl, r["id"], state, timeout=30)
    ctl.client.__exit__(None, None, None)
    second = make_controller(
        private_broker, chunk_size=65536, rollout_step_s=0.2, data_dir=ctl.runtime.settings.data_dir
    )
    second.runtime.rollouts.clock = clock
    after = get(second, r["id"])
    assert after["state"] == state and after["wave_index"] == before["wave_index"]
    if state == "waiting_window":
        t = time.time()
        offset[0] = 12 * 3600 - (t % 3600) + 60
    if state == "gating":
        for p in peers:
            p.telemetry_s = 0.05
    for p in peers:
        p.release(*held)
    if state == "awaiting_approval":
        assert second.client.post(f"/api/v1/rollouts/{r['id']}/approve", headers=second.auth).status_code == 200
    if state == "paused":
        assert second.client.post(f"/api/v1/rollouts/{r['id']}/resume", headers=second.auth).status_code == 200
    done = until_state(second, r["id"], "completed", "aborted", timeout=120)
    path = [(t["from_state"], t["to_state"], t["reason"]) for t in done["transitions"]]
    assert done["state"] == end, (path, [(p.device_id, p.state.value) for p in peers])
    expected_version = 2 if end == "completed" else 1
    wait_until(
        lambda: all(p.serving is not None and p.serving.version == expected_version for p in peers if p.deploys), 30
    )
    entered = [t for t in done["transitions"] if t["to_state"] == state and t["wave"] == before["wave_index"]]
    assert len(entered) == 1  # resumed, not replayed


def test_reports_missed_while_the_controller_was_down_are_recovered(  # type: ignore[no-untyped-def]
    private_broker, make_controller, ctl, fleet
) -> None:
    """A device finishes its deployment while no controller listens (its reports are lost): the restarted
    controller re-sends the command, the device answers with where it is, and the wave goes on at once
    instead of waiting for the device timeout (the race behind a flaky ``resumes[paused]``)."""
    peers = fleet(2)
    for p in peers:
        p.hold("activate")
    r = rollout(ctl, waves=fast_waves("1", "100%"))
    canary = wait_until(lambda: [p for p in peers if p.deploys], 30, what="the canary got its command")[0]
    dep_url = f"/api/v1/deployments/{get(ctl, r['id'])['waves'][0]['deployment_id']}"
    wait_until(lambda: ctl.client.get(dep_url).json()["targets"][0]["state"] == "staged", 30)
    ctl.client.__exit__(None, None, None)
    canary.release("activate")  # switches and reports while no controller is connected
    wait_until(lambda: canary.serving is not None and canary.serving.version == 2, 10)
    for p in peers:
        p.release("activate")
    second = make_controller(
        private_broker, chunk_size=65536, rollout_step_s=0.2, data_dir=ctl.runtime.settings.data_dir
    )
    done = until_state(second, r["id"], "completed", "aborted", timeout=40)  # the device timeout is 60 s
    path = [(t["from_state"], t["to_state"], t["reason"]) for t in done["transitions"]]
    assert done["state"] == "completed", path
    assert all(p.serving is not None and p.serving.version == 2 for p in peers)

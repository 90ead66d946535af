"""The transition table, and the exact sequence of states each scenario walks through it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.actions import Publish
from agent.deploy.actions import Action, Job, Switch
from agent.deploy.errors import InvalidTransition
from agent.deploy.jobs import JobRunner
from agent.deploy.manager import DeploymentManager
from agent.deploy.memory import MemorySlotStorage
from agent.deploy.modelops import SelfTestReport
from agent.deploy.record import MemoryRecordStore
from agent.deploy.states import BEFORE_SWITCH, FINAL, TRANSITIONS, Event, resumable, transition
from tests.agent.deploy.fake_ops import SimulatedModelOps
from tests.agent.deploy.harness import (
    Artifact,
    Device,
    activate,
    cancel,
    deliver,
    deploy,
    memory_device,
    rollback,
)
from wire import codec, topics
from wire.messages import DeployState, ShadowSpec
from wire.topics import DeviceChannel

S = DeployState


# ------------------------------------------------------------------ table --


def test_failed_and_rolling_back_are_reachable_from_every_step_after_downloading() -> None:
    for state in (S.DOWNLOADING, S.VERIFYING, S.STAGED, S.SHADOW, S.ACTIVATING, S.ACTIVE):
        direct = TRANSITIONS.get((state, Event.FAIL))
        undo = TRANSITIONS.get((state, Event.REVERT))
        # before the switch: straight to FAILED; after it: back to the previous model first
        assert direct == S.FAILED or (undo == S.ROLLING_BACK and transition(undo, Event.REVERTED) == S.FAILED), state
        assert transition(state, Event.ROLLBACK) == S.ROLLING_BACK, state
    assert transition(S.ROLLING_BACK, Event.ROLLED_BACK) == S.ROLLED_BACK
    assert transition(S.ROLLING_BACK, Event.REVERTED) == S.FAILED


def test_cancel_only_before_the_switch_and_never_from_a_final_state() -> None:
    for state in S:
        assert ((state, Event.CANCEL) in TRANSITIONS) == (state in BEFORE_SWITCH), state
    for state in FINAL:
        assert not resumable(state)
    with pytest.raises(InvalidTransition, match="not allowed in state 'active'"):
        transition(S.ACTIVE, Event.CANCEL)


def test_every_resumable_state_resumes_into_itself_and_has_a_crash_loop_exit() -> None:
    for state in S:
        if resumable(state):
            assert transition(state, Event.RESUME) == state
            assert transition(state, Event.CRASH_LOOP) in (S.FAILED, S.ROLLING_BACK)
    # after the switch a crash loop goes back to the previous model, before it there is nothing to undo
    assert transition(S.ACTIVATING, Event.CRASH_LOOP) == S.ROLLING_BACK
    assert transition(S.DOWNLOADING, Event.CRASH_LOOP) == S.FAILED


def test_every_state_of_the_protocol_appears_in_the_table() -> None:
    mentioned = {s for (s, _e) in TRANSITIONS} | set(TRANSITIONS.values())
    assert mentioned == set(S)


# -------------------------------------------------------------- scenarios --

HAPPY = [S.IDLE, S.DOWNLOADING, S.VERIFYING, S.STAGED, S.ACTIVATING, S.ACTIVE]
Scenario = Callable[[Device, Artifact, Artifact, Ed25519PrivateKey], None]


def happy(d: Device, v1: Artifact, v2: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(deploy(v2))
    deliver(d, v2)


def staged_then_activate(d: Device, v1: Artifact, v2: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(deploy(v2, activate=False))
    deliver(d, v2)
    assert d.state == S.STAGED and d.active_artifact() == v1.id
    d.command(activate())


def shadow_then_switch(d: Device, v1: Artifact, v2: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(deploy(v2, shadow=ShadowSpec(sample_rate=1.0, min_samples=1, max_duration_s=30)))
    deliver(d, v2)


def cancelled_while_downloading(d: Device, v1: Artifact, v2: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(deploy(v2))
    d.chunk(v2.frame(0), art=v2)
    d.command(cancel())


def cancelled_while_staged(d: Device, v1: Artifact, v2: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(deploy(v2, activate=False))
    deliver(d, v2)
    d.command(cancel())


def self_test_fails(d: Device, v1: Artifact, v2: Artifact, key: Ed25519PrivateKey) -> None:
    d.use_ops(SimulatedModelOps(self_test=lambda s: SelfTestReport(False, "self-test failed (latency): slow")))
    d.command(deploy(v2))
    deliver(d, v2)


def switch_fails(d: Device, v1: Artifact, v2: Artifact, key: Ed25519PrivateKey) -> None:
    def load_error(slot: str | None, signed: object) -> str | None:
        return "onnxruntime: out of memory" if getattr(signed, "manifest", None) is v2.manifest else None

    d.use_ops(SimulatedModelOps(load_error=load_error))
    d.command(deploy(v2))
    deliver(d, v2)


def corrupt_on_disk_then_repaired(d: Device, v1: Artifact, v2: Artifact, key: Ed25519PrivateKey) -> None:
    received = d.manager.counters["chunks_received"]
    d.command(deploy(v2))  # chunks shared with v1 are copied at once; only the changed one is missing
    assert isinstance(d.storage, MemorySlotStorage) and d.manager.record is not None
    assert d.manager.bitmap is not None and d.manager.bitmap.has(0) and d.manager.counters["copied"] == 4
    d.storage.corrupt(d.manager.record.target_slot or "", 0)  # bit rot after the copy was written
    deliver(d, v2)
    # the changed chunk came over MQTT; the rotten one was copied again from the intact active slot
    assert d.manager.counters["chunks_received"] - received == 1 and d.manager.counters["copied"] == 5


def rolled_back_after_switch(d: Device, v1: Artifact, v2: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(deploy(v2))
    deliver(d, v2)
    d.command(rollback(key, "dep-1", v1, with_manifest=False))


def rolled_back_before_switch(d: Device, v1: Artifact, v2: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(deploy(v2, activate=False))
    deliver(d, v2)
    d.command(rollback(key, "dep-1", v1, with_manifest=False))  # v1 still serves: nothing to switch


def activated_while_downloading(d: Device, v1: Artifact, v2: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(deploy(v2, activate=False))
    d.command(activate())  # early: remembered, the switch follows the self-test
    deliver(d, v2)


def already_active(d: Device, v1: Artifact, v2: Artifact, key: Ed25519PrivateKey) -> None:
    d.command(deploy(v1, "dep-1"))  # the controller lost track: the device runs this artifact already


SCENARIOS: list[tuple[Scenario, list[DeployState], str]] = [
    (happy, HAPPY, "v2"),
    (staged_then_activate, HAPPY, "v2"),
    (
        shadow_then_switch,
        [S.IDLE, S.DOWNLOADING, S.VERIFYING, S.STAGED, S.SHADOW, S.STAGED, S.ACTIVATING, S.ACTIVE],
        "v2",
    ),
    (cancelled_while_downloading, [S.IDLE, S.DOWNLOADING, S.CANCELLED], "v1"),
    (cancelled_while_staged, [S.IDLE, S.DOWNLOADING, S.VERIFYING, S.STAGED, S.CANCELLED], "v1"),
    (self_test_fails, [S.IDLE, S.DOWNLOADING, S.VERIFYING, S.FAILED], "v1"),
    (switch_fails, [*HAPPY[:-1], S.ROLLING_BACK, S.FAILED], "v1"),
    (corrupt_on_disk_then_repaired, [S.IDLE, S.DOWNLOADING, S.VERIFYING, S.DOWNLOADING, *HAPPY[2:]], "v2"),
    (rolled_back_after_switch, [*HAPPY, S.ROLLING_BACK, S.ROLLED_BACK], "v1"),
    (rolled_back_before_switch, [S.IDLE, S.DOWNLOADING, S.VERIFYING, S.STAGED, S.ROLLING_BACK, S.ROLLED_BACK], "v1"),
    (activated_while_downloading, HAPPY, "v2"),
    (already_active, [S.IDLE, S.ACTIVE], "v1"),
]


def _device_on_v1(key: Ed25519PrivateKey, v1: Artifact) -> Device:
    d = memory_device(key)
    d.start()
    d.command(deploy(v1, "dep-0"))
    deliver(d, v1)
    assert d.state == S.ACTIVE and d.active_artifact() == v1.id
    d.published.clear()
    return d


@pytest.mark.parametrize(("scenario", "expected", "ends_on"), SCENARIOS, ids=[s[0].__name__ for s in SCENARIOS])
def test_scenario_walks_the_exact_states(
    scenario: Scenario, expected: list[DeployState], ends_on: str, key: Ed25519PrivateKey, v1: Artifact, v2: Artifact
) -> None:
    d = _device_on_v1(key, v1)
    scenario(d, v1, v2, key)
    assert d.record_states() == expected
    # what the controller hears: the same transitions (IDLE is never reported)
    assert d.reported_states(d.manager.record.deployment_id)[-len(expected) + 1 :] == expected[1:]  # type: ignore[union-attr]
    assert d.active_artifact() == (v2.id if ends_on == "v2" else v1.id)
    serving = d.ops.serving if isinstance(d.ops, SimulatedModelOps) else None
    assert serving is not None and serving[1] == d.active_artifact(), "the host serves what the pointer names"


def test_every_transition_is_reported_durably_with_the_installed_model(
    key: Ed25519PrivateKey, v1: Artifact, v2: Artifact
) -> None:
    d = _device_on_v1(key, v1)
    d.command(deploy(v2))
    deliver(d, v2)
    events = d.events("dep-1")
    final = events[-1]
    assert final.state == S.ACTIVE and final.installed is not None
    assert (final.installed.version, final.installed.artifact, final.installed.active) == (2, v2.id, True)
    assert final.progress == 1.0 and final.chunks_have == final.chunks_total == len(v2)
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert d.births == 2, "a fresh birth after each switch (v1, then v2)"


def test_cancel_after_the_switch_is_refused_with_a_reason(key: Ed25519PrivateKey, v1: Artifact, v2: Artifact) -> None:
    d = _device_on_v1(key, v1)
    d.command(deploy(v2))
    deliver(d, v2)
    d.command(cancel())
    (ack,) = d.acks()
    assert not ack.ok and "send a rollback" in ack.detail
    assert d.state == S.ACTIVE and d.active_artifact() == v2.id


def test_commands_arriving_during_a_switch_wait_for_it(key: Ed25519PrivateKey, v1: Artifact, v2: Artifact) -> None:
    """At the sans-IO level: the Switch job is left running while a new Deploy arrives."""
    storage = MemorySlotStorage()
    ops = SimulatedModelOps()
    runner = JobRunner(storage, ops)
    manager = DeploymentManager("dev-1", storage, MemoryRecordStore(), key.public_key())
    manager.start(0.0)

    def run(actions: list[Action]) -> list[Switch]:
        """Carry out every job except a Switch, feeding results back; return the Switch jobs."""
        switches: list[Switch] = []
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, Switch):
                switches.append(action)
            elif isinstance(action, Job):
                result = runner.run(action)
                if result is not None:
                    queue += manager.on_result(result, 1.0)
        return switches

    assert run(manager.on_command(deploy(v1, "dep-1"), 1.0)) == []
    switches = [
        s for i in range(len(v1)) for s in run(manager.on_chunk(topics.artifact_chunks(v1.id), v1.frame(i), 1.0))
    ]
    (switch,) = switches
    assert manager.state == S.ACTIVATING
    assert manager.on_command(deploy(v2, "dep-2"), 1.0) == [], "queued behind the switch"
    result = runner.run(switch)
    assert result is not None
    actions = manager.on_result(result, 1.0)
    states = [codec.decode(DeviceChannel.EVENTS, a.payload).state for a in actions if isinstance(a, Publish)]
    assert states == [S.ACTIVE, S.DOWNLOADING], "the switch finished, then the queued deployment started"
    assert manager.record is not None and manager.record.deployment_id == "dep-2"

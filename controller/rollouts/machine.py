"""The rollout state machine: one explicit table of (state, event) -> state.

The engine persists the new state (and an audit entry with the reason) before
it acts on it, so a controller restart resumes from the table alone.
"""

from __future__ import annotations

from enum import StrEnum


class RolloutState(StrEnum):
    PENDING = "pending"  # waiting for its start time
    WAITING_WINDOW = "waiting_window"  # the next wave may only start inside a maintenance window
    DEPLOYING = "deploying"  # the current wave's devices download, verify, switch
    SHADOW_GATING = "shadow_gating"  # candidates run in shadow beside the active model; nothing switched yet
    ACTIVATING = "activating"  # shadow gate passed: the wave's devices switch
    BAKING = "baking"  # the wave runs the new model for the bake time
    GATING = "gating"  # inference metrics of the wave against the thresholds
    AWAITING_APPROVAL = "awaiting_approval"  # an operator must approve the next wave
    PAUSED = "paused"
    ABORTING = "aborting"  # every touched device goes back to its previous model
    ABORTED = "aborted"
    COMPLETED = "completed"


class RolloutEvent(StrEnum):
    START = "start"
    OUTSIDE_WINDOW = "outside_window"
    WINDOW_OPEN = "window_open"
    WAVE_READY = "wave_ready"  # success threshold met (every device active, or shadowing)
    WAVE_SHADOWING = "wave_shadowing"
    WAVE_FAILED = "wave_failed"  # failure threshold reached
    WAVE_INCOMPLETE = "wave_incomplete"  # every device finished, success below threshold
    SHADOW_PASSED = "shadow_passed"
    WAVE_ACTIVE = "wave_active"
    BAKED = "baked"
    GATES_FAILED = "gates_failed"
    NEXT_WAVE = "next_wave"
    NEED_APPROVAL = "need_approval"
    NEXT_OUTSIDE_WINDOW = "next_outside_window"
    LAST_WAVE_DONE = "last_wave_done"
    APPROVE = "approve"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK_DONE = "rollback_done"
    ADVANCE = "advance"
    ADVANCE_LAST = "advance_last"  # a manual advance past the last wave completes the rollout


S, E = RolloutState, RolloutEvent
ACTIVE_STATES = frozenset(
    {S.PENDING, S.WAITING_WINDOW, S.DEPLOYING, S.SHADOW_GATING, S.ACTIVATING, S.BAKING, S.GATING, S.AWAITING_APPROVAL}
)
TERMINAL = frozenset({S.ABORTED, S.COMPLETED})

TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (S.PENDING, E.START): S.DEPLOYING,
    (S.PENDING, E.OUTSIDE_WINDOW): S.WAITING_WINDOW,
    (S.WAITING_WINDOW, E.WINDOW_OPEN): S.DEPLOYING,
    (S.DEPLOYING, E.WAVE_READY): S.BAKING,
    (S.DEPLOYING, E.WAVE_SHADOWING): S.SHADOW_GATING,
    (S.DEPLOYING, E.WAVE_FAILED): S.ABORTING,
    (S.DEPLOYING, E.WAVE_INCOMPLETE): S.PAUSED,
    (S.SHADOW_GATING, E.SHADOW_PASSED): S.ACTIVATING,
    (S.SHADOW_GATING, E.GATES_FAILED): S.ABORTING,
    (S.SHADOW_GATING, E.WAVE_FAILED): S.ABORTING,
    (S.ACTIVATING, E.WAVE_ACTIVE): S.BAKING,
    (S.ACTIVATING, E.WAVE_FAILED): S.ABORTING,
    (S.ACTIVATING, E.WAVE_INCOMPLETE): S.PAUSED,
    (S.BAKING, E.BAKED): S.GATING,
    (S.BAKING, E.WAVE_FAILED): S.ABORTING,
    (S.GATING, E.GATES_FAILED): S.ABORTING,
    (S.GATING, E.WAVE_FAILED): S.ABORTING,
    (S.GATING, E.NEXT_WAVE): S.DEPLOYING,
    (S.GATING, E.NEED_APPROVAL): S.AWAITING_APPROVAL,
    (S.GATING, E.NEXT_OUTSIDE_WINDOW): S.WAITING_WINDOW,
    (S.GATING, E.LAST_WAVE_DONE): S.COMPLETED,
    (S.AWAITING_APPROVAL, E.APPROVE): S.DEPLOYING,
    (S.AWAITING_APPROVAL, E.NEXT_OUTSIDE_WINDOW): S.WAITING_WINDOW,
    (S.ABORTING, E.ROLLBACK_DONE): S.ABORTED,
}
# Operator actions available from every active state.
for _state in ACTIVE_STATES:
    TRANSITIONS[(_state, E.PAUSE)] = S.PAUSED
    TRANSITIONS[(_state, E.ABORT)] = S.ABORTING
for _state in (S.BAKING, S.GATING, S.AWAITING_APPROVAL, S.PAUSED, S.SHADOW_GATING):
    TRANSITIONS[(_state, E.ADVANCE)] = S.DEPLOYING  # manual advance to the next wave, skipping the gates
    TRANSITIONS[(_state, E.ADVANCE_LAST)] = S.COMPLETED
TRANSITIONS[(S.PAUSED, E.ABORT)] = S.ABORTING
TRANSITIONS[(S.PAUSED, E.RESUME)] = S.DEPLOYING  # the engine resumes where it was paused (see resume_target)


class InvalidTransition(Exception):
    def __init__(self, state: RolloutState, event: RolloutEvent) -> None:
        super().__init__(f"cannot {event.value} a rollout that is {state.value}")
        self.state, self.event = state, event


def next_state(state: RolloutState, event: RolloutEvent) -> RolloutState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(state, event) from None

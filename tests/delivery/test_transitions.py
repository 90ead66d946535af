"""The controller's per-device delivery table, checked over every state and every event (no I/O at all)."""

from __future__ import annotations

import itertools

import pytest

from controller.delivery.transitions import (
    BEFORE_SWITCH,
    EVENTS,
    IGNORE,
    PENDING,
    STATES,
    TERMINAL,
    Action,
    Control,
    Facts,
    Step,
    step,
)
from wire.messages import DeployState

D = DeployState
A = Action
ALL_FACTS = [Facts(*bits) for bits in itertools.product((False, True), repeat=3)]
GO_BACK = Step(D.ROLLING_BACK, (A.RECORD, A.NOTIFY, A.SEND_ROLLBACK, A.RESTART_CLOCK))


def expected(state: str, event: object, facts: Facts) -> Step:
    """The rules written out once more, independently of how the table is built."""
    if isinstance(event, DeployState):
        if state == D.CANCELLED:
            return GO_BACK if event == D.ACTIVE else IGNORE
        if state == D.FAILED and event not in (D.FAILED, D.ROLLED_BACK):
            if event != D.ACTIVE or not facts.timed_out:
                return IGNORE
            if facts.withdrawn and facts.has_previous:
                return GO_BACK
        if event == state:
            return Step(event, (A.RECORD,))
        if event in TERMINAL:
            return Step(event, (A.RECORD, A.NOTIFY, A.SETTLE))
        return Step(event, (A.RECORD, A.NOTIFY))
    if event == Control.CANCEL:
        return Step(D.CANCELLED, (A.SEND_CANCEL,)) if state in BEFORE_SWITCH else IGNORE
    if event == Control.ROLLBACK:
        if state in BEFORE_SWITCH:
            return Step(D.CANCELLED, (A.SEND_CANCEL,))
        if state in (D.FAILED, D.ROLLED_BACK) or not facts.has_previous:
            return IGNORE
        return Step(D.ROLLING_BACK, (A.SEND_ROLLBACK, A.RESTART_CLOCK))
    if event == Control.TIMEOUT:
        return IGNORE if state in TERMINAL else Step(D.FAILED, (A.SEND_CANCEL, A.SETTLE))
    if event == Control.GIVE_UP:
        return IGNORE if state in TERMINAL else Step(D.FAILED, (A.SEND_CANCEL, A.NOTIFY, A.SETTLE))
    if event == Control.RECONNECTED:
        if state == D.ROLLING_BACK:
            return Step(None, (A.SEND_ROLLBACK,))
        return IGNORE if state in TERMINAL else Step(None, (A.SEND_DEPLOY,))
    if event == Control.ACTIVATE:
        return Step(None, (A.SEND_ACTIVATE,)) if state in (D.STAGED, D.SHADOW) else IGNORE
    if event == Control.COMMIT:
        return Step(None, (A.SEND_COMMIT,)) if state == D.ACTIVE else IGNORE
    if event == Control.ONLINE:
        if state == PENDING:
            return Step(None, (A.SEND_DEPLOY,))
        return Step(None, (A.SEND_ROLLBACK,)) if state == D.ROLLING_BACK else IGNORE
    raise AssertionError(f"no expectation for {event!r}")


@pytest.mark.parametrize("state", STATES)
def test_every_state_and_event_has_the_expected_row(state: str) -> None:
    for event, facts in itertools.product(EVENTS, ALL_FACTS):
        assert step(state, event, facts) == expected(state, event, facts), (state, event, facts)


def test_the_table_covers_the_protocol_states_and_the_controllers_own() -> None:
    assert set(STATES) == {PENDING, *(s.value for s in DeployState)}
    assert len(EVENTS) == len(DeployState) + len(Control)
    assert not set(Control) & {s.value for s in DeployState}  # a control event is never mistaken for a report


def test_a_device_report_is_its_truth_until_the_controller_gave_up() -> None:
    assert step(PENDING, D.DOWNLOADING) == Step(D.DOWNLOADING, (A.RECORD, A.NOTIFY))
    assert step(D.DOWNLOADING, D.DOWNLOADING) == Step(D.DOWNLOADING, (A.RECORD,))  # progress only
    assert step(D.ACTIVATING, D.ACTIVE).actions[-1] == A.SETTLE
    assert step(D.FAILED, D.DOWNLOADING) == IGNORE  # a late report does not revive a failed device
    assert step(D.FAILED, D.ROLLED_BACK).state == D.ROLLED_BACK  # but going back is news


def test_a_switch_after_a_timeout_counts_and_one_after_a_withdrawal_goes_back() -> None:
    assert step(D.FAILED, D.ACTIVE, Facts(timed_out=False)) == IGNORE
    assert step(D.FAILED, D.ACTIVE, Facts(timed_out=True)).state == D.ACTIVE
    assert step(D.FAILED, D.ACTIVE, Facts(timed_out=True, withdrawn=True, has_previous=True)) == GO_BACK
    # a device with no model before keeps the new one: there is nothing to go back to
    assert step(D.FAILED, D.ACTIVE, Facts(timed_out=True, withdrawn=True)).state == D.ACTIVE
    assert step(D.CANCELLED, D.ACTIVE) == GO_BACK
    assert step(D.CANCELLED, D.DOWNLOADING) == IGNORE


def test_cancel_reaches_only_devices_that_did_not_switch_and_rollback_the_others() -> None:
    for state in STATES:
        cancelled = step(state, Control.CANCEL).state == D.CANCELLED
        assert cancelled == (state in BEFORE_SWITCH), state
    assert step(D.ACTIVE, Control.ROLLBACK, Facts(has_previous=True)) == Step(
        D.ROLLING_BACK, (A.SEND_ROLLBACK, A.RESTART_CLOCK)
    )
    assert step(D.ACTIVE, Control.ROLLBACK, Facts(has_previous=False)) == IGNORE


def test_terminal_states_take_no_control_event_that_would_fail_them() -> None:
    for state in TERMINAL:
        for event in (Control.TIMEOUT, Control.GIVE_UP, Control.CANCEL, Control.RECONNECTED):
            assert step(state, event) == IGNORE, (state, event)


def test_an_unknown_state_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown target state"):
        step("exploded", Control.CANCEL)

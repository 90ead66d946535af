"""What the controller does with one device of one deployment, as a table ``(state, event) -> (state, actions)``.

The states are the agent's ``DeployState`` plus the controller's own ``PENDING`` (the command is not
acknowledged by any report yet). The events are the device's reports (a ``DeployState``: "I am in
this state now") and the controller's own decisions (``Control``). A row says which state the target
takes and which ``Action`` the delivery's I/O layer carries out, in order; a missing row means the
event changes nothing. Nothing here reads a clock, a database or the network.

Three facts that are not states decide a few rows (``Facts``): whether a failed target failed because
the controller gave up waiting (a timeout: the device may still switch, and the truth wins), whether
the deployment was cancelled or rolled back since (a device switching now must go back), and whether
the device had a model before (without one there is nothing to go back to).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from wire.messages import DeployState

D = DeployState

#: the controller's own state: the Deploy is sent (or queued), no report yet
PENDING = "pending"
#: a target's state: ``PENDING`` or a ``DeployState`` (``DeployState`` is a ``StrEnum``: its members are strings)
State = str

STATES: tuple[State, ...] = (PENDING, *DeployState)
#: states in which nothing more happens without a report or a new command
TERMINAL = frozenset({D.ACTIVE, D.FAILED, D.ROLLED_BACK, D.CANCELLED})
SUCCESS = D.ACTIVE
#: states in which the device has not switched yet (a cancel keeps its old model)
BEFORE_SWITCH = frozenset({PENDING, D.IDLE, D.DOWNLOADING, D.VERIFYING, D.STAGED, D.SHADOW})
#: reported states that mean every chunk is held (a report without chunk counts sets progress to 1)
DOWNLOADED = frozenset({D.VERIFYING, D.STAGED, D.SHADOW, D.ACTIVATING, D.ACTIVE})


class Control(StrEnum):
    """The controller's own events (a device's report is a ``DeployState``)."""

    CANCEL = "ctl:cancel"  # an operator cancelled the deployment
    ROLLBACK = "ctl:rollback"  # an operator (or an aborted rollout) rolled the deployment back
    TIMEOUT = "ctl:timeout"  # the device exceeded the deployment's timeout
    GIVE_UP = "ctl:give_up"  # its chunks cannot be delivered (store damaged, or damaged on the way again and again)
    ACTIVATE = "ctl:activate"  # switch a device waiting in STAGED or SHADOW
    COMMIT = "ctl:commit"  # the new model is confirmed
    ONLINE = "ctl:online"  # the device was born again: re-send what it may have missed
    RECONNECTED = "ctl:reconnected"  # the controller's broker connection is (back) up


Event = DeployState | Control
EVENTS: tuple[Event, ...] = (*DeployState, *Control)


class Action(StrEnum):
    """What the I/O layer does for a row, in the row's order."""

    RECORD = "record"  # apply the report's state, reason, progress and metrics to the target
    SEND_DEPLOY = "send_deploy"  # (re-)send the target's Deploy, sealed afresh
    SEND_CANCEL = "send_cancel"
    SEND_ROLLBACK = "send_rollback"  # a signed rollback grant to the model the device had before
    SEND_ACTIVATE = "send_activate"
    SEND_COMMIT = "send_commit"
    RESTART_CLOCK = "restart_clock"  # the target's timeout counts from now (a rollback gets a full one)
    NOTIFY = "notify"  # count the transition, tell the listeners (the rollout engine)
    SETTLE = "settle"  # the target ended: start queued devices, finish the deployment when all ended


@dataclass(frozen=True)
class Facts:
    """What besides the state a few rows depend on."""

    timed_out: bool = False  # the target failed because the controller stopped waiting (TIMEOUT)
    withdrawn: bool = False  # the deployment was cancelled or rolled back
    has_previous: bool = False  # the device had a model before this deployment


@dataclass(frozen=True)
class Step:
    """A row's outcome: the target's new state (None: unchanged) and the actions, in order."""

    state: State | None = None
    actions: tuple[Action, ...] = ()

    @property
    def ignored(self) -> bool:
        return self.state is None and not self.actions


IGNORE = Step()
Rule = Step | Callable[[Facts], Step]
A = Action


def _report(old: State, new: DeployState) -> Step:
    """A report applied as the device says it (the state is its truth)."""
    if new == old:
        return Step(new, (A.RECORD,))
    return Step(new, (A.RECORD, A.NOTIFY, A.SETTLE) if new in TERMINAL else (A.RECORD, A.NOTIFY))


def _switched_when_failed(facts: Facts) -> Step:
    """An ACTIVE report of a device the controller gave up on: if it gave up on a timeout, the device switched
    after all (the truth wins); if the deployment was withdrawn since, it must go back like the others."""
    if not facts.timed_out:
        return IGNORE  # late reports of a device failed for cause do not revive it
    if facts.withdrawn and facts.has_previous:
        return Step(D.ROLLING_BACK, (A.RECORD, A.NOTIFY, A.SEND_ROLLBACK, A.RESTART_CLOCK))
    return _report(D.FAILED, D.ACTIVE)


def _rollback(old: State) -> Rule:
    """A rollback: before the switch it is a cancel; after it a signed grant back to the previous model."""
    if old in BEFORE_SWITCH:
        return Step(D.CANCELLED, (A.SEND_CANCEL,))
    if old in (D.ROLLED_BACK, D.FAILED):
        return IGNORE

    def grant(facts: Facts) -> Step:
        return Step(D.ROLLING_BACK, (A.SEND_ROLLBACK, A.RESTART_CLOCK)) if facts.has_previous else IGNORE

    return grant


def _rows() -> dict[tuple[State, Event], Rule]:
    rows: dict[tuple[State, Event], Rule] = {}
    for old in STATES:
        for reported in DeployState:
            rows[(old, reported)] = _report(old, reported)
        rows[(old, Control.ROLLBACK)] = _rollback(old)
    # a failed target takes only reports that it failed or went back, and the late switch of a timeout
    for reported in DeployState:
        if reported not in (D.FAILED, D.ROLLED_BACK):
            rows[(D.FAILED, reported)] = IGNORE
    rows[(D.FAILED, D.ACTIVE)] = _switched_when_failed
    # a cancelled target ignores the reports still in flight, except a switch that crossed the cancel on the wire
    for reported in DeployState:
        rows[(D.CANCELLED, reported)] = IGNORE
    rows[(D.CANCELLED, D.ACTIVE)] = Step(D.ROLLING_BACK, (A.RECORD, A.NOTIFY, A.SEND_ROLLBACK, A.RESTART_CLOCK))
    for old in BEFORE_SWITCH:
        rows[(old, Control.CANCEL)] = Step(D.CANCELLED, (A.SEND_CANCEL,))
    for old in STATES:
        if old not in TERMINAL:
            rows[(old, Control.TIMEOUT)] = Step(D.FAILED, (A.SEND_CANCEL, A.SETTLE))
            rows[(old, Control.GIVE_UP)] = Step(D.FAILED, (A.SEND_CANCEL, A.NOTIFY, A.SETTLE))
            rows[(old, Control.RECONNECTED)] = Step(None, (A.SEND_DEPLOY,))
    for old in (D.STAGED, D.SHADOW):
        rows[(old, Control.ACTIVATE)] = Step(None, (A.SEND_ACTIVATE,))
    rows[(D.ACTIVE, Control.COMMIT)] = Step(None, (A.SEND_COMMIT,))
    rows[(PENDING, Control.ONLINE)] = Step(None, (A.SEND_DEPLOY,))
    rows[(D.ROLLING_BACK, Control.ONLINE)] = Step(None, (A.SEND_ROLLBACK,))
    # a device rolling back is re-sent its rollback grant, not the Deploy it is undoing (nudges, broker reconnects)
    rows[(D.ROLLING_BACK, Control.RECONNECTED)] = Step(None, (A.SEND_ROLLBACK,))
    return rows


TRANSITIONS: dict[tuple[State, Event], Rule] = _rows()


_KNOWN = frozenset(STATES)


def step(state: State, event: Event, facts: Facts | Callable[[], Facts] = Facts()) -> Step:
    """The row for ``event`` in ``state`` (IGNORE when there is none). ``facts`` may be a function: it is
    called only for the few rows that need them (a device report is handled on the MQTT thread)."""
    rule = TRANSITIONS.get((state, event))
    if rule is None:
        if state not in _KNOWN:
            raise ValueError(f"unknown target state {state!r}")
        return IGNORE
    if isinstance(rule, Step):
        return rule
    return rule(facts() if callable(facts) else facts)

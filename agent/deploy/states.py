"""The deployment state machine as one explicit table ``(state, event) -> state``.

``IDLE -> DOWNLOADING -> VERIFYING -> STAGED -> [SHADOW] -> ACTIVATING -> ACTIVE``; ``FAILED`` and
``ROLLING_BACK -> ROLLED_BACK`` are reachable from every step after DOWNLOADING, ``CANCELLED`` from every
step before the switch. VERIFYING covers the file hashes and the self-test in the inactive slot, so
STAGED means "verified and self-tested, ready to switch".

Resuming after a crash is derived from the same table: a state that has a ``RESUME`` row is resumed
(the manager re-issues that state's work, which is idempotent); one without is final. ``CRASH_LOOP``
rows say where a deployment goes when it keeps being restarted in one state without progress.
"""

from __future__ import annotations

from enum import StrEnum

from agent.deploy.errors import InvalidTransition
from wire.messages import DeployState

S = DeployState


class Event(StrEnum):
    """What can happen to a deployment."""

    ACCEPT = "accept"  # a valid Deploy: start downloading
    REJECT = "reject"  # a Deploy that must not be installed (signature, expiry, version, space)
    ALREADY_ACTIVE = "already_active"  # the artifact is the one serving already
    DOWNLOADED = "downloaded"  # every chunk is held
    VERIFIED = "verified"  # file hashes and the self-test passed
    CORRUPT = "corrupt"  # a file did not match after assembly: fetch its bad chunks again
    SHADOW = "shadow"  # run the candidate beside the active model
    SHADOW_DONE = "shadow_done"
    ACTIVATE = "activate"  # switch (automatically, or the Activate command)
    SWITCHED = "switched"  # the pointer and the model host serve the new slot
    RESTORED = "restored"  # a rollback that had to fetch the older artifact has switched to it
    COMMIT = "commit"  # the controller confirmed: the previous slot may be freed
    FAIL = "fail"  # an error before the switch: the active model never changed
    REVERT = "revert"  # an error after the switch: go back to the previous slot, then FAILED
    REVERTED = "reverted"
    ROLLBACK = "rollback"  # the signed Rollback command
    ROLLBACK_FETCH = "rollback_fetch"  # the rollback target is not on the device: download it
    ROLLED_BACK = "rolled_back"
    CANCEL = "cancel"
    RESUME = "resume"  # the agent restarted in this state
    CRASH_LOOP = "crash_loop"  # ... too many times without progress


#: every step after DOWNLOADING started, before the switch
BEFORE_SWITCH = (S.DOWNLOADING, S.VERIFYING, S.STAGED, S.SHADOW)
#: steps in which the new model is (being) switched in
SWITCHING = (S.ACTIVATING, S.ACTIVE)
#: states a restarted agent picks up again (ACTIVE only until the Commit: the previous slot is kept)
RESUMABLE = (*BEFORE_SWITCH, S.ACTIVATING, S.ACTIVE, S.ROLLING_BACK)
#: states in which nothing more happens without a new command
FINAL = (S.IDLE, S.FAILED, S.ROLLED_BACK, S.CANCELLED)

TRANSITIONS: dict[tuple[DeployState, Event], DeployState] = {
    (S.IDLE, Event.ACCEPT): S.DOWNLOADING,
    (S.IDLE, Event.REJECT): S.FAILED,
    (S.IDLE, Event.ALREADY_ACTIVE): S.ACTIVE,
    (S.DOWNLOADING, Event.DOWNLOADED): S.VERIFYING,
    (S.VERIFYING, Event.VERIFIED): S.STAGED,
    (S.VERIFYING, Event.CORRUPT): S.DOWNLOADING,
    (S.STAGED, Event.SHADOW): S.SHADOW,
    (S.SHADOW, Event.SHADOW_DONE): S.STAGED,
    (S.STAGED, Event.ACTIVATE): S.ACTIVATING,
    (S.SHADOW, Event.ACTIVATE): S.ACTIVATING,
    (S.ACTIVATING, Event.SWITCHED): S.ACTIVE,
    (S.ACTIVATING, Event.RESTORED): S.ROLLED_BACK,
    (S.ACTIVE, Event.COMMIT): S.ACTIVE,
    **{(s, Event.FAIL): S.FAILED for s in BEFORE_SWITCH},
    (S.ROLLING_BACK, Event.FAIL): S.FAILED,  # even the previous model cannot be restored
    **{(s, Event.REVERT): S.ROLLING_BACK for s in SWITCHING},
    (S.ROLLING_BACK, Event.REVERTED): S.FAILED,
    # A signed rollback is honoured from any step, and on a device that has no record of the deployment.
    **{(s, Event.ROLLBACK): S.ROLLING_BACK for s in (S.IDLE, *BEFORE_SWITCH, *SWITCHING, S.FAILED, S.CANCELLED)},
    (S.ROLLING_BACK, Event.ROLLBACK_FETCH): S.DOWNLOADING,
    (S.ROLLING_BACK, Event.ROLLED_BACK): S.ROLLED_BACK,
    **{(s, Event.CANCEL): S.CANCELLED for s in BEFORE_SWITCH},
    **{(s, Event.RESUME): s for s in RESUMABLE},
    **{(s, Event.CRASH_LOOP): S.FAILED for s in (*BEFORE_SWITCH, S.ROLLING_BACK)},
    **{(s, Event.CRASH_LOOP): S.ROLLING_BACK for s in SWITCHING},
}


def transition(state: DeployState, event: Event) -> DeployState:
    """The state after ``event`` in ``state``; raise InvalidTransition when the table has no such row."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"event {event.value!r} is not allowed in state {state.value!r}") from None


def allowed(state: DeployState, event: Event) -> bool:
    return (state, event) in TRANSITIONS


def resumable(state: DeployState) -> bool:
    """True when a restarted agent picks a deployment in ``state`` up again (it has a RESUME row)."""
    return (state, Event.RESUME) in TRANSITIONS

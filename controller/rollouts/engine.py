"""The rollout engine: advances each rollout through the state table, one idempotent step at a time.

``step`` reads a rollout from the database, decides the next event from what
the devices report, persists the transition with its reason in the audit log,
and only then acts (start a wave, activate, roll back). Acting twice is
harmless, so a controller killed between persisting and acting resumes right.
A scheduler job steps every running rollout each second; a device failure
also steps its rollout at once, so an abort is decided within the failure's
own message handling.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.cluster.keeper import Ownership, SoleOwner
from controller.cluster.leases import StaleLease
from controller.db.models import Deployment, Device, ModelVersion, Rollout, RolloutTransition
from controller.db.models import Model as ModelRow
from controller.delivery.port import Deliveries
from controller.delivery.service import DeploymentError, DeploymentRequest
from controller.delivery.targets import TERMINAL, Target
from controller.devices import selectors
from controller.rollouts import baseline, gates
from controller.rollouts.machine import ACTIVE_STATES, InvalidTransition, next_state
from controller.rollouts.machine import RolloutEvent as E
from controller.rollouts.machine import RolloutState as S
from controller.rollouts.plan import RolloutCreate, RolloutShadow, WaveSpec, amount, assign, default_plan
from controller.rollouts.windows import in_window
from wire.messages import ShadowSpec

log = logging.getLogger(__name__)

FAILED_STATES = frozenset({"failed", "rolled_back"})
SHADOW_READY = frozenset({"shadow", "staged"})
LATE_SCAN_S = 5.0


def shadow_spec(shadow: RolloutShadow | None) -> ShadowSpec | None:
    return None if shadow is None else ShadowSpec(**shadow.model_dump())


class RolloutError(Exception):
    def __init__(self, message: str, status: int = 422, field: str | None = None) -> None:
        """``field``: the part of the request it is about, when that is not the model or the selector (forms)."""
        super().__init__(message)
        self.status = status
        self.field = field


class RolloutEngine:
    def __init__(
        self,
        engine: Engine,
        delivery: Deliveries,
        clock: Any = time.time,
        on_transition: Callable[[Session, Rollout, str, str, str, str, str], None] | None = None,
        owner: Ownership | None = None,
    ) -> None:
        """The delivery tells the engine of each target's change: give it ``on_target_change``. ``owner``: who
        drives which rollout (replicas: the holder of the lease ``rollout:<id>``; every write it makes is fenced
        with the lease's token); default: this process drives them all."""
        self.engine = engine
        self.owner: Ownership = owner or SoleOwner()
        #: set while an operator's action (API) writes: not fenced, whichever replica serves the request
        self._operator = False
        self.delivery = delivery
        self.clock = clock
        self._lock = threading.RLock()
        self._deployment_rollout: dict[str, str] = {}
        self._last_late_scan: dict[str, float] = {}
        #: told of every transition inside its transaction (session, rollout, from, event, to, reason, actor):
        #: the notifications, which commit with the transition they report
        self.on_transition = on_transition

    # ---------------------------------------------------------- create --

    def create(self, spec: RolloutCreate, actor: str) -> str:
        try:
            parsed = selectors.parse(spec.selector)
            for wave in spec.waves or []:
                selectors.parse(wave.selector)
        except selectors.SelectorError as exc:
            raise RolloutError(str(exc)) from None
        waves = spec.waves or default_plan()
        with Session(self.engine) as session:
            model = session.exec(select(ModelRow).where(ModelRow.name == spec.model)).first()
            if model is None:
                raise RolloutError(f"model {spec.model!r} not found", 404)
            version = session.exec(
                select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.number == spec.version)
            ).first()
            if version is None:
                raise RolloutError(f"model {spec.model!r} has no version {spec.version}", 404)
            rows = [d for d in session.exec(select(Device).order_by(col(Device.id))).all() if parsed.matches(d.labels)]
            devices = {d.id: d.labels for d in rows}
            if not devices:
                raise RolloutError(f"no device matches the selector {spec.selector!r}", 409)
            reason = f"{len(devices)} devices in {len(waves)} waves"
            if spec.shadow is not None:
                try:
                    reason += "; " + baseline.check(session, model, version, rows, spec.shadow)
                except baseline.BaselineError as exc:
                    raise RolloutError(str(exc), field="shadow_against") from None
            rollout_id = uuid.uuid4().hex
            assert version.id is not None
            stored = spec.model_dump(mode="json")
            stored["waves"] = [w.model_dump(mode="json") for w in waves]
            rollout = Rollout(
                id=rollout_id,
                model_name=spec.model,
                version_number=spec.version,
                version_id=version.id,
                selector=spec.selector,
                spec=stored,
                assignment=assign(devices, waves, rollout_id),
                created_by=actor,
            )
            session.add(rollout)
            session.add(
                RolloutTransition(
                    rollout_id=rollout_id,
                    from_state="",
                    event="create",
                    to_state=S.PENDING,
                    reason=reason,
                    actor=actor,
                )
            )
            session.commit()
        log.info("rollout %s: %s v%d to %d devices", rollout_id[:8], spec.model, spec.version, len(devices))
        self.step(rollout_id)
        return rollout_id

    # ------------------------------------------------------------ steps --

    def step_all(self) -> None:
        with Session(self.engine) as session:
            ids = session.exec(
                select(Rollout.id).where(col(Rollout.state).notin_([S.ABORTED.value, S.COMPLETED.value]))
            ).all()
        for rollout_id in ids:
            name = lease_name(rollout_id)
            if self.owner.drive(name, ("rollout", len(ids))) is None:
                continue  # another replica drives it (or this one has its fair share already)
            try:
                self.step(rollout_id)
            except StaleLease as exc:
                self._refused(name, exc)
            except Exception:
                log.exception("rollout %s: step failed", rollout_id[:8])
        if self.owner.clustered:  # finished rollouts need no driver any more
            active = {lease_name(i) for i in ids}
            for name in self.owner.held():
                if name.startswith("rollout:") and name not in active:
                    self.owner.release(name)

    def _refused(self, name: str, exc: StaleLease) -> None:
        refused = getattr(self.owner, "refused_write", None)
        if refused is not None:
            refused(name, exc)
        else:
            log.warning("%s", exc)

    def step(self, rollout_id: str) -> str:
        """Advance one rollout as far as the facts allow; returns its state (unchanged when another replica
        drives it)."""
        if self.owner.clustered and self.owner.drive(lease_name(rollout_id)) is None:
            with Session(self.engine) as session:
                found = session.get(Rollout, rollout_id)
                if found is None:
                    raise RolloutError(f"rollout {rollout_id!r} not found", 404)
                return found.state
        with self._lock, Session(self.engine) as session:
            rollout = session.get(Rollout, rollout_id)
            if rollout is None:
                raise RolloutError(f"rollout {rollout_id!r} not found", 404)
            for _ in range(len(rollout.spec["waves"]) * 4 + 4):  # several transitions may be due at once
                before = (rollout.state, rollout.wave_index)
                self._step_once(session, rollout)
                if (rollout.state, rollout.wave_index) == before:
                    break
            return rollout.state

    def _step_once(self, session: Session, r: Rollout) -> None:
        state = S(r.state)
        now = self.clock()
        spec = RolloutCreate.model_validate(r.spec)
        if state in ACTIVE_STATES and state != S.PENDING:
            self._late_devices(session, r, spec, now)
        if state == S.PENDING:
            if spec.start_at is not None and spec.start_at.timestamp() > now:
                return
            if not in_window(spec.windows, datetime.fromtimestamp(now, UTC)):
                self._transition(session, r, E.OUTSIDE_WINDOW, "outside every maintenance window")
                return
            self._transition(session, r, E.START, "start time reached")
            self._start_wave(session, r, spec)
        elif state == S.WAITING_WINDOW:
            if in_window(spec.windows, datetime.fromtimestamp(now, UTC)):
                self._transition(session, r, E.WINDOW_OPEN, "maintenance window open")
                self._start_wave(session, r, spec)
        elif state == S.DEPLOYING:
            self._start_wave(session, r, spec)  # idempotent: creates the wave's deployment if missing
            self._judge_wave(session, r, spec, activating=False)
        elif state == S.SHADOW_GATING:
            self._shadow_gate(session, r, spec, now)
        elif state == S.ACTIVATING:
            self._judge_wave(session, r, spec, activating=True)
        elif state == S.BAKING:
            if self._failure_reached(session, r, spec):
                return
            if now - r.state_since.timestamp() >= self._wave(spec, r).bake_s:
                self._transition(session, r, E.BAKED, f"baked {self._wave(spec, r).bake_s:.0f}s")
        elif state == S.GATING:
            self._gate(session, r, spec, now)
        elif state == S.ABORTING:
            self._finish_abort(session, r)

    # ---------------------------------------------------------- waves --

    @staticmethod
    def _wave(spec: RolloutCreate, r: Rollout) -> WaveSpec:
        return spec.waves[r.wave_index] if spec.waves else default_plan()[r.wave_index]

    def _wave_devices(self, r: Rollout, index: int) -> list[str]:
        return sorted(d for d, w in r.assignment.items() if w == index)

    def _start_wave(self, session: Session, r: Rollout, spec: RolloutCreate) -> None:
        """Create the current wave's deployment unless it exists; skip waves without devices."""
        waves = spec.waves or default_plan()
        while r.wave_index < len(waves) and not self._wave_devices(r, r.wave_index):
            r.wave_index += 1  # an empty wave (a small fleet): nothing to do
        if r.wave_index >= len(waves):
            self._persist(session, r)
            return
        key = str(r.wave_index)
        if key in r.wave_deployments:
            self._deployment_rollout[r.wave_deployments[key]] = r.id
            return
        existing = session.exec(
            select(Deployment).where(Deployment.rollout_id == r.id, Deployment.rollout_wave == r.wave_index)
        ).first()
        if existing is not None:  # created before a crash, not yet recorded on the rollout
            deployment_id = existing.id
        else:
            wave = waves[r.wave_index]
            request = DeploymentRequest(
                model=r.model_name,
                version=r.version_number,
                variant=spec.variant,
                device_ids=self._wave_devices(r, r.wave_index),
                activate=spec.shadow is None,
                shadow=shadow_spec(spec.shadow),
                timeout_s=wave.device_timeout_s,
                rollout_id=r.id,
                rollout_wave=r.wave_index,
                max_concurrent=wave.max_concurrent,
            )
            try:
                deployment_id = self.delivery.create(request, f"rollout {r.id[:8]}")
            except DeploymentError as exc:
                self._transition(session, r, E.ABORT, f"wave {r.wave_index + 1} could not start: {exc}")
                return
        r.wave_deployments = {**r.wave_deployments, key: deployment_id}
        self._deployment_rollout[deployment_id] = r.id
        self._persist(session, r)

    def _targets(self, r: Rollout, index: int | None = None) -> list[Target]:
        keys = [str(index)] if index is not None else list(r.wave_deployments)
        out: list[Target] = []
        for key in keys:
            dep = r.wave_deployments.get(key)
            if dep:
                out.extend(self.delivery.targets(dep))
        return out

    def _failure_reached(self, session: Session, r: Rollout, spec: RolloutCreate) -> bool:
        targets = self._targets(r, r.wave_index)
        failed = [t for t in targets if t.state in FAILED_STATES]
        limit = amount(self._wave(spec, r).failure_threshold, len(targets))
        if targets and failed and len(failed) >= max(limit, 1):
            reasons = "; ".join(sorted({t.reason for t in failed if t.reason})[:3])
            self._transition(
                session,
                r,
                E.WAVE_FAILED,
                f"{len(failed)} of {len(targets)} devices failed in wave {r.wave_index + 1}"
                f" (threshold {self._wave(spec, r).failure_threshold}): {reasons}",
            )
            self._abort_actions(r)
            return True
        return False

    def _judge_wave(self, session: Session, r: Rollout, spec: RolloutCreate, activating: bool) -> None:
        if str(r.wave_index) not in r.wave_deployments:
            return
        if self._failure_reached(session, r, spec):
            return
        targets = self._targets(r, r.wave_index)
        wave = self._wave(spec, r)
        need = wave.success_threshold / 100.0 * len(targets)
        active = sum(1 for t in targets if t.state == "active")
        if spec.shadow is not None and not activating:
            ready = [t for t in targets if t.state in SHADOW_READY and "shadow_samples" in t.metrics]
            if len(ready) >= need and len(ready) > 0:
                self._transition(session, r, E.WAVE_SHADOWING, f"{len(ready)} of {len(targets)} devices in shadow")
                return
        elif active >= need and active > 0:
            event = E.WAVE_ACTIVE if activating else E.WAVE_READY
            self._transition(session, r, event, f"{active} of {len(targets)} devices active")
            return
        if all(t.terminal for t in targets):
            self._transition(
                session,
                r,
                E.WAVE_INCOMPLETE,
                f"only {active} of {len(targets)} devices succeeded; the wave needs"
                f" {wave.success_threshold:.0f}%: paused for an operator",
            )

    def _shadow_gate(self, session: Session, r: Rollout, spec: RolloutCreate, now: float) -> None:
        if self._failure_reached(session, r, spec):
            return
        targets = self._targets(r, r.wave_index)
        result = gates.shadow_gate(spec.gates, {t.device_id: t.metrics for t in targets if t.metrics})
        r.gate_results = [result.as_dict()]
        self._persist(session, r)
        if result.status == "fail":
            self._transition(
                session,
                r,
                E.GATES_FAILED,
                f"shadow agreement {result.value:.3f} below {result.threshold} before any device switched",
            )
            self._abort_actions(r)
        elif result.status in ("pass", "off"):
            self._transition(session, r, E.SHADOW_PASSED, f"shadow agreement {result.value}")
            self.delivery.activate(r.wave_deployments[str(r.wave_index)])
        elif now - r.state_since.timestamp() > spec.gates.deadline_s:
            self._transition(
                session,
                r,
                E.GATES_FAILED,
                f"shadow gate without enough samples after {spec.gates.deadline_s:.0f}s ({result.detail})",
            )
            self._abort_actions(r)

    def _gate(self, session: Session, r: Rollout, spec: RolloutCreate, now: float) -> None:
        if self._failure_reached(session, r, spec):
            return
        targets = [t for t in self._targets(r, r.wave_index) if t.state == "active"]
        activated = {t.device_id: datetime.fromtimestamp(t.finished_at or t.updated_at, UTC) for t in targets}
        results = gates.telemetry_gates(self.engine, spec.gates, r.model_name, r.version_number, activated)
        r.gate_results = [g.as_dict() for g in results]
        self._persist(session, r)
        verdict = gates.verdict(results)
        if verdict == "fail":
            failed = [
                f"{g.name} {g.value:.4g} (limit {g.comparison} {g.threshold})" for g in results if g.status == "fail"
            ]
            self._transition(session, r, E.GATES_FAILED, "gate failed: " + ", ".join(failed))
            self._abort_actions(r)
            return
        if verdict == "waiting":
            if now - r.state_since.timestamp() > spec.gates.deadline_s:
                waiting = [f"{g.name}: {g.detail}" for g in results if g.status == "waiting"]
                self._transition(
                    session,
                    r,
                    E.GATES_FAILED,
                    f"gates still without enough evidence after {spec.gates.deadline_s:.0f}s: " + "; ".join(waiting),
                )
                self._abort_actions(r)
            return
        self._next_wave(session, r, spec, now, gates.passed_reason(r.wave_index))

    def _next_wave(
        self, session: Session, r: Rollout, spec: RolloutCreate, now: float, reason: str, manual: bool = False
    ) -> None:
        waves = spec.waves or default_plan()
        later = [i for i in range(r.wave_index + 1, len(waves)) if self._wave_devices(r, i)]
        if not later:
            self._transition(session, r, E.ADVANCE_LAST if manual else E.LAST_WAVE_DONE, reason + "; last wave done")
            self._complete_actions(r)
            return
        if not manual and self._wave(spec, r).require_approval and S(r.state) == S.GATING:
            self._transition(session, r, E.NEED_APPROVAL, reason + "; waiting for approval")
            return
        if not in_window(spec.windows, datetime.fromtimestamp(now, UTC)):
            r.wave_index = later[0]
            self._transition(session, r, E.NEXT_OUTSIDE_WINDOW, reason + "; next wave waits for a window")
            return
        r.wave_index = later[0]
        self._transition(session, r, E.NEXT_WAVE if not manual else E.ADVANCE, reason)
        self._start_wave(session, r, spec)

    def _complete_actions(self, r: Rollout) -> None:
        for dep in r.wave_deployments.values():
            self.delivery.commit(dep)

    # ------------------------------------------------------------ abort --

    def _abort_actions(self, r: Rollout) -> None:
        for dep in r.wave_deployments.values():
            try:
                self.delivery.rollback(dep, f"rollout {r.id[:8]}", f"rollout {r.id[:8]} aborted")
            except DeploymentError as exc:
                log.warning("rollout %s: rollback of %s: %s", r.id[:8], dep[:8], exc)

    def _finish_abort(self, session: Session, r: Rollout) -> None:
        touched = self._targets(r)
        # a device that had no model before keeps the new one: there is nothing to go back to
        keeps = [t for t in touched if t.state == "active" and not t.previous]
        waiting = [t for t in touched if not t.terminal]
        if not waiting:
            note = f"; {len(keeps)} had no previous model and keep the new one" if keeps else ""
            self._transition(
                session,
                r,
                E.ROLLBACK_DONE,
                f"{len(touched) - len(keeps)} touched devices back on their previous model{note}",
            )

    # ---------------------------------------------------------- operator --

    def act(self, rollout_id: str, action: str, actor: str, reason: str = "") -> str:
        """pause, resume, abort, approve or advance; returns the new state."""
        with self._lock, Session(self.engine) as session, self._as_operator():
            r = session.get(Rollout, rollout_id)
            if r is None:
                raise RolloutError(f"rollout {rollout_id!r} not found", 404)
            state = S(r.state)
            spec = RolloutCreate.model_validate(r.spec)
            why = reason or f"{action} by {actor}"
            try:
                if action == "pause":
                    paused_from = state
                    self._transition(session, r, E.PAUSE, why, actor)
                    r.paused_from = paused_from.value
                    self._persist(session, r)
                elif action == "resume":
                    if state != S.PAUSED:
                        raise InvalidTransition(state, E.RESUME)
                    back = S(r.paused_from or S.DEPLOYING.value)
                    self._record(session, r, state, E.RESUME, back, why, actor)
                    r.state, r.state_since, r.paused_from = back.value, self._now_dt(), None
                    self._persist(session, r)
                elif action == "abort":
                    self._transition(session, r, E.ABORT, why, actor)
                    self._abort_actions(r)
                elif action == "approve":
                    if state != S.AWAITING_APPROVAL:
                        raise InvalidTransition(state, E.APPROVE)
                    if not in_window(spec.windows, datetime.fromtimestamp(self.clock(), UTC)):
                        self._transition(session, r, E.NEXT_OUTSIDE_WINDOW, why + "; waiting for a window", actor)
                    else:
                        self._transition(session, r, E.APPROVE, why, actor)
                        r.wave_index = self._after(r, spec)
                        self._persist(session, r)
                        self._start_wave(session, r, spec)
                elif action == "advance":
                    next_state(state, E.ADVANCE)  # validates
                    self._next_wave(session, r, spec, self.clock(), why, manual=True)
                else:
                    raise RolloutError(f"unknown action {action!r}")
            except InvalidTransition as exc:
                raise RolloutError(str(exc), 409) from None
        if action in ("resume", "approve", "advance"):
            self.step(rollout_id)
        with Session(self.engine) as session:
            fresh = session.get(Rollout, rollout_id)
            return fresh.state if fresh else ""

    def _after(self, r: Rollout, spec: RolloutCreate) -> int:
        waves = spec.waves or default_plan()
        later = [i for i in range(r.wave_index + 1, len(waves)) if self._wave_devices(r, i)]
        return later[0] if later else r.wave_index

    # ------------------------------------------------------ late devices --

    def _late_devices(self, session: Session, r: Rollout, spec: RolloutCreate, now: float) -> None:
        if now - self._last_late_scan.get(r.id, 0.0) < LATE_SCAN_S:
            return
        self._last_late_scan[r.id] = now
        parsed = selectors.parse(r.selector)
        known = set(r.assignment) | set(r.excluded)
        new = [d.id for d in session.exec(select(Device)).all() if d.id not in known and parsed.matches(d.labels)]
        if not new:
            return
        waves = spec.waves or default_plan()
        if spec.late_devices == "none":
            r.excluded = [*r.excluded, *new]
            self._persist(session, r)
            return
        index = r.wave_index
        if spec.late_devices == "next" and index + 1 < len(waves):
            index += 1
        assignment = dict(r.assignment)
        for device_id in new:
            assignment[device_id] = index
        r.assignment = assignment
        self._persist(session, r)
        deployment = r.wave_deployments.get(str(index))
        if deployment is not None and S(r.state) not in (S.ABORTING,):
            added = self.delivery.add_devices(deployment, new)
            log.info("rollout %s: %d late devices joined wave %d", r.id[:8], len(added), index)

    # -------------------------------------------------------------- hooks --

    def on_target_change(self, target: Target) -> None:
        """A device of some deployment changed state (MQTT thread): failures are judged at once."""
        rollout_id = self._deployment_rollout.get(target.deployment_id)
        if rollout_id is None or target.state not in FAILED_STATES | TERMINAL:
            return
        if self.owner.holds(lease_name(rollout_id)) is None:
            return  # its driver steps it (every rollout_step_s)
        try:
            self.step(rollout_id)
        except StaleLease as exc:
            self._refused(lease_name(rollout_id), exc)
        except Exception:
            log.exception("rollout %s: step after a device change failed", rollout_id[:8])

    def resume_all(self) -> None:
        """After a restart: learn which deployments belong to which rollout."""
        with Session(self.engine) as session:
            for r in session.exec(select(Rollout)).all():
                for dep in r.wave_deployments.values():
                    self._deployment_rollout[dep] = r.id

    # ------------------------------------------------------------- record --

    def _now_dt(self) -> datetime:
        """The engine's clock as a datetime: every duration it judges (bake, deadlines) uses this one clock."""
        return datetime.fromtimestamp(self.clock(), UTC)

    def _transition(self, session: Session, r: Rollout, event: E, reason: str, actor: str = "system") -> None:
        state = S(r.state)
        new = next_state(state, event)
        self._record(session, r, state, event, new, reason, actor)
        if self.on_transition is not None:
            try:
                self.on_transition(session, r, state.value, event.value, new.value, reason, actor)
            except Exception:  # a notification that cannot be written never holds a rollout up
                log.exception("rollout %s: notifying %s failed", r.id[:8], new.value)
        r.state, r.state_since, r.reason = new.value, self._now_dt(), reason[:2000]
        if new in (S.COMPLETED, S.ABORTED):
            r.finished_at = self._now_dt()
        self._persist(session, r)
        log.info("rollout %s: %s -> %s (%s)", r.id[:8], state.value, new.value, reason)

    def _record(self, session: Session, r: Rollout, state: S, event: E, new: S, reason: str, actor: str) -> None:
        session.add(
            RolloutTransition(
                rollout_id=r.id,
                at=self._now_dt(),
                from_state=state.value,
                event=event.value,
                to_state=new.value,
                wave=r.wave_index,
                reason=reason[:2000],
                actor=actor,
            )
        )

    @contextmanager
    def _as_operator(self) -> Iterator[None]:
        self._operator = True
        try:
            yield
        finally:
            self._operator = False

    def _persist(self, session: Session, r: Rollout) -> None:
        session.add(r)
        if not self._operator:
            # fenced: refused (StaleLease) unless this replica's token is still the rollout lease's
            self.owner.fence(session.connection(), lease_name(r.id))
        session.commit()
        session.refresh(r)


def lease_name(rollout_id: str) -> str:
    return f"rollout:{rollout_id}"

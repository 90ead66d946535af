"""Who drives what in this process: ``SoleOwner`` (one controller: it drives everything, no database traffic) or
``LeaseKeeper`` (a replica: leases in the database, renewed by a thread).

The keeper renews every held lease each ``ttl/3``. If it cannot (the database is unreachable, or the lease was
taken), it stops driving before the lease can expire anywhere: each lease has a local monotonic deadline, the
start of its last successful renewal + ttl - margin, and ``holds`` answers None past it. Writes are fenced too
(``fence``), so a replica that was paused past its deadline (SIGSTOP, a long GC, a slow disk) cannot overwrite
the new driver's work when it wakes up.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import Connection, Engine
from sqlmodel import Session

from controller.cluster import leases, replicas
from controller.cluster.leases import StaleLease
from controller.db.models import AuditEntry

log = logging.getLogger(__name__)

#: told of a lease this replica took (name, token) or lost (name)
Listener = Callable[[str, int], None]
LostListener = Callable[[str], None]


class Ownership(Protocol):
    replica_id: str
    clustered: bool

    def drive(self, name: str, share: tuple[str, int] | None = None) -> int | None: ...
    def holds(self, name: str) -> int | None: ...
    def fence(self, conn: Connection, name: str) -> None: ...
    def release(self, name: str) -> None: ...
    def held(self) -> dict[str, int]: ...


class SoleOwner:
    """The single-process controller: it holds every lease, always, without asking the database."""

    clustered = False

    def __init__(self, replica_id: str = "solo") -> None:
        self.replica_id = replica_id

    def drive(self, name: str, share: tuple[str, int] | None = None) -> int | None:
        return 0

    def holds(self, name: str) -> int | None:
        return 0

    def fence(self, conn: Connection, name: str) -> None:
        return None

    def release(self, name: str) -> None:
        return None

    def held(self) -> dict[str, int]:
        return {}


class LeaseKeeper:
    """Leases of one replica, renewed by the ``lease-keeper`` thread; also keeps the replica's registry row."""

    clustered = True

    def __init__(
        self,
        engine: Engine,
        replica_id: str,
        ttl_s: float,
        *,
        url: str = "",
        version: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.replica_id = replica_id
        self.ttl_s = ttl_s
        #: stop driving this long before the lease could expire in the database (the renewal's own latency)
        self.margin_s = max(0.5, ttl_s / 6)
        self.url = url
        self.version = version
        self.clock = clock
        self._lock = threading.Lock()
        #: name -> (token, local deadline)
        self._held: dict[str, tuple[int, float]] = {}
        self.on_acquired: list[Listener] = []
        self.on_lost: list[LostListener] = []
        self._alive = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: how many writes were refused as stale (for tests and metrics)
        self.refused = 0

    # ------------------------------------------------------------ life --

    def start(self) -> None:
        replicas.register(self.engine, self.replica_id, self.url, self.version)
        self._count_alive()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Release every lease (another replica takes over at once) and leave the registry."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            held, self._held = dict(self._held), {}
        try:
            for name, (token, _) in held.items():
                leases.release(self.engine, name, self.replica_id, token)
            replicas.unregister(self.engine, self.replica_id)
        except Exception as exc:  # the database is gone: the leases expire by themselves
            log.warning("cluster: could not release leases at stop: %s", exc)

    def _run(self) -> None:
        period = self.ttl_s / 3
        while not self._stop.wait(period):
            self.renew_all()

    # ------------------------------------------------------------ work --

    def renew_all(self) -> None:
        """Renew each held lease; drop those lost or past their local deadline."""
        try:
            replicas.heartbeat(self.engine, self.replica_id)
            self._count_alive()
        except Exception as exc:
            log.warning("cluster: heartbeat failed: %s", exc)
        with self._lock:
            held = dict(self._held)
        for name, (token, deadline) in held.items():
            started = self.clock()
            try:
                ok = leases.renew(self.engine, name, self.replica_id, token, self.ttl_s)
            except Exception as exc:
                ok = None
                log.warning("cluster: renewing %s failed: %s", name, exc)
            if ok:
                with self._lock:
                    if name in self._held:
                        self._held[name] = (token, started + self.ttl_s - self.margin_s)
            elif ok is False or self.clock() >= deadline:
                self._lose(name, "taken over or expired" if ok is False else "could not renew before its deadline")

    def _lose(self, name: str, why: str) -> None:
        with self._lock:
            if self._held.pop(name, None) is None:
                return
        log.warning("cluster: %s lost %s (%s): no longer driving it", self.replica_id, name, why)
        for listener in list(self.on_lost):
            try:
                listener(name)
            except Exception:
                log.exception("cluster: on_lost(%s) failed", name)

    def _count_alive(self) -> None:
        stale = self.ttl_s * 3
        self._alive = max(1, sum(1 for r in replicas.all_replicas(self.engine) if r.alive(stale)))

    @property
    def alive_replicas(self) -> int:
        return self._alive

    def holds(self, name: str) -> int | None:
        with self._lock:
            entry = self._held.get(name)
        if entry is None:
            return None
        token, deadline = entry
        if self.clock() >= deadline:
            self._lose(name, "its deadline passed without a renewal")
            return None
        return token

    def drive(self, name: str, share: tuple[str, int] | None = None) -> int | None:
        """My token for ``name``, taking the lease when it is free or expired; None when another replica holds it.
        ``share`` (kind, how many things of that kind want a driver): take a new one only while this replica
        holds fewer than its fair share of them."""
        token = self.holds(name)
        if token is not None:
            return token
        if share is not None:
            kind, total = share
            mine = sum(1 for n in self.held() if n.startswith(kind + ":"))
            if mine >= math.ceil(total / self.alive_replicas):
                return None
        started = self.clock()
        try:
            got = leases.acquire(self.engine, name, self.replica_id, self.ttl_s)
        except Exception as exc:
            log.warning("cluster: acquiring %s failed: %s", name, exc)
            return None
        if got is None:
            return None
        with self._lock:
            self._held[name] = (got.token, started + self.ttl_s - self.margin_s)
        if got.previous is not None:
            self._audit_takeover(name, got)
        for listener in list(self.on_acquired):
            try:
                listener(name, got.token)
            except Exception:
                log.exception("cluster: on_acquired(%s) failed", name)
        return got.token

    def fence(self, conn: Connection, name: str) -> None:
        """Refuse (StaleLease) a write about ``name`` unless my token is still the lease's, in ``conn``'s
        transaction."""
        with self._lock:
            entry = self._held.get(name)
        if entry is None:
            self.refused += 1
            raise StaleLease(f"{name}: {self.replica_id} does not hold it")
        try:
            leases.fence(conn, name, self.replica_id, entry[0])
        except StaleLease:
            self.refused += 1
            raise

    def release(self, name: str) -> None:
        with self._lock:
            entry = self._held.pop(name, None)
        if entry is not None:
            try:
                leases.release(self.engine, name, self.replica_id, entry[0])
            except Exception as exc:
                log.warning("cluster: releasing %s failed: %s", name, exc)

    def held(self) -> dict[str, int]:
        now = self.clock()
        with self._lock:
            return {name: token for name, (token, deadline) in self._held.items() if now < deadline}

    def refused_write(self, name: str, exc: Exception) -> None:
        """Log and audit a write this replica made with a stale token (refused by ``fence``)."""
        log.warning("cluster: %s: stale driver's write refused: %s", self.replica_id, exc)
        try:
            with Session(self.engine) as session:
                session.add(
                    AuditEntry(
                        actor=f"replica {self.replica_id}",
                        action="cluster.write_refused",
                        target=name[:256],
                        detail={"replica": self.replica_id, "reason": str(exc)[:500]},
                    )
                )
                session.commit()
        except Exception:
            log.exception("cluster: could not audit a refused write")

    def _audit_takeover(self, name: str, got: leases.Acquired) -> None:
        kind, _, thing = name.partition(":")
        message = f"replica {self.replica_id} took {kind} {thing[:12]} from {got.previous} (token {got.token})"
        log.warning("cluster: %s", message)
        try:
            with Session(self.engine) as session:
                session.add(
                    AuditEntry(
                        actor=f"replica {self.replica_id}",
                        action="cluster.takeover",
                        target=name[:256],
                        detail={
                            "message": message,
                            "from": got.previous,
                            "to": self.replica_id,
                            "token": got.token,
                            "previous_token": got.previous_token,
                        },
                    )
                )
                session.commit()
        except Exception:
            log.exception("cluster: could not audit the takeover of %s", name)

"""The driver: runs the DeploymentManager's jobs off the network thread and feeds the results back.

The agent service builds one with ``DeploymentDriver.open(...)`` and passes it to ``AgentCore`` as its
``deployments`` hook; the core routes the deployment commands, the chunk frames, reconnects and ticks
to it and returns the transport actions to the service as usual. Jobs run one at a time in a worker
thread; their results are handed back to the event loop with ``post`` and the transport actions they
lead to go out through ``emit``. Wiring in ``agent/runtime/service.py``::

    self.deploy = DeploymentDriver.open(
        s.device_id, s.data_dir, self.host, s.signing_key_file,
        post=self._loop.call_soon_threadsafe, emit=self._execute,
        config=DeployConfig(store_max_bytes=s.store_max_bytes),
    )
    self.core = AgentCore(..., deployments=self.deploy)   # routes commands and chunks, reports installed
    self._execute(self.deploy.start(time.time()))         # resume a deployment, serve the active slot
    # in _execute:  elif isinstance(action, Unsubscribe): transport.unsubscribe(action.filter)
    # inference worker, after each record:  self.deploy.shadow.offer(record, result)
    # shutdown:  self.deploy.close()

Simulated fleets and unit tests build it with ``threaded=False`` over memory storage: jobs then run
inline and their results are processed before the call that caused them returns.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from agent.core.actions import Publish, Subscribe
from agent.core.core import CoreAction, DeployCommand, Unsubscribe
from agent.deploy.actions import Action, InstalledChanged, Job, Result
from agent.deploy.config import DeployConfig
from agent.deploy.disk import DiskSlotStorage
from agent.deploy.jobs import JobRunner, failure
from agent.deploy.manager import DeploymentManager
from agent.deploy.modelops import HostModelOps
from agent.deploy.record import DiskRecordStore
from agent.deploy.shadow import ShadowTap
from agent.deploy.verify import load_pinned_key
from agent.inference.host import Loaded, ModelHost
from agent.inference.loader import ModelLoader
from wire.messages import InstalledModel

log = logging.getLogger(__name__)

Post = Callable[[Callable[[], None]], object]
Emit = Callable[[list[CoreAction]], object]


class DeploymentDriver:
    """Implements ``agent.core.DeploymentHooks`` around a DeploymentManager and a JobRunner."""

    def __init__(
        self,
        manager: DeploymentManager,
        runner: JobRunner,
        *,
        post: Post | None = None,
        emit: Emit | None = None,
        clock: Callable[[], float] = time.time,
        threaded: bool = True,
        tap: ShadowTap | None = None,
        executor: Executor | None = None,
    ) -> None:
        """``post(fn)`` runs ``fn`` on the thread that owns the manager (the event loop);
        ``emit(actions)`` carries out transport actions there. Both are needed when ``threaded``.

        ``executor`` replaces the one worker thread of a threaded driver: the simulator passes one that
        runs each job on the event loop after the time the job would take on the simulated hardware.
        """
        threaded = threaded or executor is not None
        if threaded and (post is None or emit is None):
            raise ValueError("a threaded DeploymentDriver needs post (to the event loop) and emit")
        self.manager = manager
        self.runner = runner
        self.shadow = tap or ShadowTap()
        self._post = post
        self._emit = emit
        self._clock = clock
        if executor is None and threaded:
            executor = ThreadPoolExecutor(1, thread_name_prefix="deploy")
        self._executor = executor
        self._inbox: deque[Result] = deque()
        self._birth: Callable[[float], Publish] | None = None
        self._closed = False
        runner.report = self._report

    @classmethod
    def open(
        cls,
        device_id: str,
        data_dir: Path,
        host: ModelHost,
        signing_key_file: Path | None,
        *,
        post: Post,
        emit: Emit,
        config: DeployConfig | None = None,
        static_model: Callable[[], Loaded | None] | None = None,
        clock: Callable[[], float] = time.time,
        loader: ModelLoader | None = None,
    ) -> DeploymentDriver:
        """The driver of a real device: slots and record under ``data_dir/deploy``, models on ``host``.

        Without a readable pinned key (``signing_key_file``) the agent still runs and serves, but
        refuses every deployment with a reason that says so.
        """
        config = config or DeployConfig()
        root = Path(data_dir) / "deploy"
        key = None
        if signing_key_file is None:
            log.warning("no signing key pinned (signing_key_file): deployments will be refused")
        else:
            try:
                key = load_pinned_key(signing_key_file)
            except ValueError as exc:
                log.error("%s; deployments will be refused", exc)
        storage = DiskSlotStorage(root, store_max_bytes=config.store_max_bytes, reserve_bytes=config.disk_reserve_bytes)
        tap = ShadowTap()
        runner = JobRunner(storage, HostModelOps(host, storage, tap, static_model=static_model, loader=loader))
        manager = DeploymentManager(device_id, storage, DiskRecordStore(root), key, config)
        return cls(manager, runner, post=post, emit=emit, clock=clock, tap=tap)

    # --------------------------------------------------- DeploymentHooks --

    def bind(self, birth: Callable[[float], Publish]) -> None:
        self._birth = birth

    def handles(self, topic: str) -> bool:
        return self.manager.handles(topic)

    def start(self, now: float) -> list[CoreAction]:
        """Resume the persisted deployment and serve the active slot; call once before connecting."""
        return self._process(self.manager.start(now), now)

    def on_command(self, command: DeployCommand, now: float) -> list[CoreAction]:
        return self._process(self.manager.on_command(command, now), now)

    def on_chunk(self, topic: str, payload: bytes, now: float) -> list[CoreAction]:
        return self._process(self.manager.on_chunk(topic, payload, now), now)

    def on_connected(self, now: float) -> list[CoreAction]:
        return self._process(self.manager.on_connected(now), now)

    def tick(self, now: float) -> list[CoreAction]:
        return self._process(self.manager.tick(now), now)

    def next_wakeup(self) -> float | None:
        return self.manager.next_wakeup()

    def installed(self) -> list[InstalledModel]:
        return self.manager.installed()

    def has_active_model(self) -> bool:
        """True when a slot is active: the service then serves it instead of a configured static model."""
        slot = self.manager.storage.active_slot()
        meta = self.manager.storage.meta(slot) if slot is not None else None
        return meta is not None and meta.status == "ready"

    def pump(self) -> list[CoreAction]:
        """Unthreaded drivers: process results reported outside a call (a shadow run's end)."""
        return self._process([])

    # ---------------------------------------------------------- running --

    def _process(self, actions: list[Action], now: float | None = None) -> list[CoreAction]:
        """Start the jobs, turn InstalledChanged into a birth, return the transport actions.

        Unthreaded, job results are handled here too, at the time of the call that caused them
        (``now``), so a simulation's clock stays its own.
        """
        out: list[CoreAction] = []
        queue: deque[Action] = deque(actions)
        while True:
            while queue:
                action = queue.popleft()
                if isinstance(action, Publish | Subscribe | Unsubscribe):
                    out.append(action)
                elif isinstance(action, InstalledChanged):
                    if self._birth is not None:
                        out.append(self._birth(self._clock() if now is None else now))
                else:
                    self._submit(action)
            if not self._inbox:
                return out
            queue.extend(self.manager.on_result(self._inbox.popleft(), self._clock() if now is None else now))

    def _submit(self, job: Job) -> None:
        if self._executor is None:
            result = self._run(job)
            if result is not None:
                self._inbox.append(result)
            return
        if self._closed:
            return
        self._executor.submit(self._run_and_post, job)

    def _run(self, job: Job) -> Result | None:
        try:
            return self.runner.run(job)
        except Exception as exc:  # a bug must fail the deployment, not the agent
            log.exception("deployment job %s failed", type(job).__name__)
            return failure(job, f"internal error in {type(job).__name__}: {exc}")

    def _run_and_post(self, job: Job) -> None:
        result = self._run(job)
        if result is not None:
            self._report(result)

    def _report(self, result: Result) -> None:
        """A result from a worker or shadow thread: hand it to the manager's thread."""
        if self._executor is None:
            self._inbox.append(result)  # deque.append is thread-safe; processed by the next call
            return
        assert self._post is not None
        self._post(lambda: self._deliver(result))

    def _deliver(self, result: Result) -> None:
        if self._closed:
            return
        out = self._process(self.manager.on_result(result, self._clock()))
        if out and self._emit is not None:
            self._emit(out)

    def close(self) -> None:
        """Stop: end a shadow run, let a running job finish (a switch is never cut in half), drop the rest."""
        self._closed = True
        self.shadow.end()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        close = getattr(self.manager.storage, "close", None)
        if close is not None:
            close()

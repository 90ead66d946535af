"""Model operations behind the jobs: self-test, load for serving, switch, shadow.

``HostModelOps`` does them for real with the agent's ``ModelHost`` (onnxruntime pipelines); virtual
devices have their own (``simulations.device.modelops``), the deployment tests a scripted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.deploy.actions import ShadowReport
from agent.deploy.errors import DeployError, SelfTestError
from agent.deploy.ids import artifact_id
from agent.deploy.selftest import run_self_test
from agent.deploy.shadow import ShadowSession, ShadowTap
from agent.deploy.storage import SlotStorage
from agent.inference.bundle import ModelSource
from agent.inference.host import Loaded, ModelHost
from agent.inference.loader import ModelLoader
from agent.telemetry.system import rss_bytes
from wire.manifest import SignedManifest
from wire.messages import ModelRef, ShadowSpec

log = logging.getLogger(__name__)

Report = Callable[[ShadowReport], None]


@dataclass
class SelfTestReport:
    ok: bool
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


class ModelOps(Protocol):
    def self_test(self, slot: str, signed: SignedManifest, keep: bool) -> SelfTestReport:
        """Load the slot's model beside the active one and test it; keep it loaded when ``keep``."""
        ...

    def load_for_serving(self, slot: str | None, signed: SignedManifest | None) -> Any:
        """A loaded model ready to serve (None slot: the model that served before any slot). Raises."""
        ...

    def serve(self, handle: Any) -> None:
        """Serve ``handle`` from now on (never fails: the loading was done before)."""
        ...

    def start_shadow(self, token: int, slot: str, signed: SignedManifest, spec: ShadowSpec, report: Report) -> None: ...

    def stop_shadow(self, token: int) -> None: ...

    def discard(self, slot: str) -> None:
        """Drop candidates of ``slot`` that will not serve."""
        ...


def _ref(signed: SignedManifest) -> ModelRef:
    m = signed.manifest
    return ModelRef(model=m.model, version=m.version, variant=m.variant)


class HostModelOps:
    """Model operations on the agent's ModelHost.

    ``static_model`` loads the model the agent serves when no slot is active (its configured model),
    so a failed first deployment can go back to it even after a restart.
    """

    def __init__(
        self,
        host: ModelHost,
        storage: SlotStorage,
        tap: ShadowTap,
        *,
        static_model: Callable[[], Loaded | None] | None = None,
        loader: ModelLoader | None = None,
    ) -> None:
        self.host = host
        #: loads under the agent's memory ceiling for a model (model_max_rss_mib); None: no ceiling
        self.loader = loader
        self.storage = storage
        self.tap = tap
        self.static_model = static_model
        self._candidates: dict[tuple[str, str], Loaded] = {}
        self._baseline: tuple[Any, Path, ModelRef | None, str] | None = None
        self._shadow_token: int | None = None

    def _bundle(self, slot: str) -> Path:
        path = self.storage.bundle_dir(slot)
        if path is None:
            raise DeployError(f"slot {slot} has no files to load a model from")
        return path

    def _from_slot(self, loaded: Loaded | None) -> bool:
        return loaded is not None and any(self.storage.bundle_dir(slot) == loaded.bundle_dir for slot in ("a", "b"))

    def _load(self, slot: str, signed: SignedManifest) -> Loaded:
        m = signed.manifest
        if self.loader is not None:  # refuses a model over the ceiling (estimated, then measured)
            source = ModelSource(self._bundle(slot), m.run_spec(), _ref(signed), artifact_id(m), m)
            return self.loader.load(source, warmup=False)
        return self.host.load(m.run_spec(), self._bundle(slot), _ref(signed), artifact_id(m))

    # ---------------------------------------------------------- self-test --

    def self_test(self, slot: str, signed: SignedManifest, keep: bool) -> SelfTestReport:
        m = signed.manifest
        self.discard(slot)
        rss_before = rss_bytes()
        start = time.perf_counter()
        try:
            loaded = self._load(slot, signed)
        except Exception as exc:  # an untrusted bundle: any failure to load is the model's fault
            return SelfTestReport(False, f"self-test failed (load): the model does not load: {exc}")
        load_ms = (time.perf_counter() - start) * 1000.0
        try:
            metrics = run_self_test(loaded.pipeline, m.run_spec(), m.budget)
        except SelfTestError as exc:
            self.host.discard(loaded)
            return SelfTestReport(False, f"self-test failed ({exc.reason}): {exc}")
        except Exception as exc:
            self.host.discard(loaded)
            return SelfTestReport(False, f"self-test failed: {exc}")
        rss_delta = max(0, rss_bytes() - rss_before)
        metrics.update(selftest_load_ms=round(load_ms, 3), selftest_rss_delta_bytes=float(rss_delta))
        budget = m.budget.max_rss_bytes
        if budget and rss_delta > budget:
            self.host.discard(loaded)
            return SelfTestReport(
                False,
                f"self-test failed (memory): loading took {rss_delta} bytes of RSS, the budget is {budget}",
                metrics,
            )
        if keep:
            self._candidates[(slot, artifact_id(m))] = loaded
        else:
            self.host.discard(loaded)  # do not hold two models in memory while waiting for Activate
        return SelfTestReport(True, "", metrics)

    # ------------------------------------------------------------ serving --

    def is_serving(self, slot: str | None, artifact_id: str | None) -> bool:
        current = self.host.current()
        if slot is None:
            return current is not None and not self._from_slot(current)
        return (
            current is not None
            and current.artifact_id == artifact_id
            and current.bundle_dir == self.storage.bundle_dir(slot)
        )

    def load_for_serving(self, slot: str | None, signed: SignedManifest | None) -> Loaded | None:
        if slot is None:
            return self._load_baseline()
        assert signed is not None
        artifact = artifact_id(signed.manifest)
        if self.is_serving(slot, artifact):
            return self.host.current()
        loaded = self._candidates.pop((slot, artifact), None)
        if loaded is not None:
            return loaded
        loaded = self._load(slot, signed)
        try:
            loaded.pipeline.warmup()
        except Exception as exc:
            self.host.discard(loaded)
            raise DeployError(f"the model of slot {slot} loads but fails its warm-up: {exc}") from exc
        return loaded

    def _load_baseline(self) -> Loaded | None:
        current = self.host.current()
        if current is not None and not self._from_slot(current):
            return current
        if self._baseline is not None:
            spec, bundle, ref, artifact = self._baseline
            return self.host.load(spec, bundle, ref, artifact)
        if self.static_model is not None:
            return self.static_model()
        raise DeployError("no model served before the first deployment; there is nothing to go back to")

    def serve(self, handle: Loaded | None) -> None:
        current = self.host.current()
        if handle is current:
            return
        if current is not None and not self._from_slot(current):
            # Remember the model that served before any slot, to go back to it on a rollback.
            self._baseline = (current.spec, current.bundle_dir, current.ref, current.artifact_id)
        self.host.switch(handle)

    # ------------------------------------------------------------- shadow --

    def start_shadow(self, token: int, slot: str, signed: SignedManifest, spec: ShadowSpec, report: Report) -> None:
        key = (slot, artifact_id(signed.manifest))
        loaded = self._candidates.get(key)
        if loaded is None:
            try:
                loaded = self._candidates[key] = self._load(slot, signed)
            except Exception as exc:
                report(ShadowReport(token, {}, f"the candidate does not load: {exc}"))
                return

        def done(metrics: dict[str, float], error: str) -> None:
            report(ShadowReport(token, metrics, error))

        self._shadow_token = token
        self.tap.begin(ShadowSession(loaded.pipeline, signed.manifest.task, spec, done))

    def stop_shadow(self, token: int) -> None:
        if self._shadow_token == token:
            self._shadow_token = None
            self.tap.end()

    def discard(self, slot: str) -> None:
        for key in [k for k in self._candidates if k[0] == slot]:
            loaded = self._candidates.pop(key)
            if self.tap.running:
                self.tap.end()
            self.host.discard(loaded)

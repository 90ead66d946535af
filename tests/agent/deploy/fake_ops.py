"""``ModelOps`` for the deployment tests: nothing is loaded, the outcomes are scripted."""

from __future__ import annotations

from collections.abc import Callable

from agent.deploy.actions import ShadowReport
from agent.deploy.errors import DeployError
from agent.deploy.ids import artifact_id
from agent.deploy.modelops import Report, SelfTestReport
from wire.manifest import SignedManifest
from wire.messages import ShadowSpec


class SimulatedModelOps:
    """Model operations for simulated devices: nothing is loaded; ``self_test`` and ``load_error``
    script the outcomes (e.g. a variant that fails on some hardware profiles)."""

    def __init__(
        self,
        *,
        self_test: Callable[[SignedManifest], SelfTestReport] | None = None,
        load_error: Callable[[str | None, SignedManifest | None], str | None] | None = None,
        shadow_metrics: Callable[[SignedManifest], dict[str, float]] | None = None,
    ) -> None:
        self._self_test = self_test
        self._load_error = load_error
        self._shadow_metrics = shadow_metrics
        self.serving: tuple[str | None, str | None] | None = None
        self.loads = 0

    def self_test(self, slot: str, signed: SignedManifest, keep: bool) -> SelfTestReport:
        return self._self_test(signed) if self._self_test is not None else SelfTestReport(True)

    def load_for_serving(self, slot: str | None, signed: SignedManifest | None) -> tuple[str | None, str | None]:
        reason = self._load_error(slot, signed) if self._load_error is not None else None
        if reason:
            raise DeployError(reason)
        self.loads += 1
        return (slot, artifact_id(signed.manifest) if signed is not None else None)

    def serve(self, handle: tuple[str | None, str | None]) -> None:
        self.serving = handle

    def start_shadow(self, token: int, slot: str, signed: SignedManifest, spec: ShadowSpec, report: Report) -> None:
        metrics = self._shadow_metrics(signed) if self._shadow_metrics is not None else {"shadow_samples": 0.0}
        report(ShadowReport(token, metrics))

    def stop_shadow(self, token: int) -> None:
        return None

    def discard(self, slot: str) -> None:
        return None

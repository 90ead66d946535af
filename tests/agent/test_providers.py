"""onnxruntime's providers are listed by a child (``python -m agent.telemetry.providers``), not this process."""

from __future__ import annotations

from agent.telemetry.system import _probe_providers


def test_a_child_lists_onnxruntime_providers() -> None:
    providers = _probe_providers()
    assert providers is not None and "CPUExecutionProvider" in providers

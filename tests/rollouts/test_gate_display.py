"""What the agent reports for the gates, and how the CLI shows a gate's decision."""

from __future__ import annotations

from rich.console import Console

from agent.core.core import TelemetrySample
from controller.cli.rollouts import gate_interval, render
from wire.messages import ModelRef, Telemetry


def test_telemetry_carries_serving_time_and_the_models_own_memory_and_old_messages_still_parse() -> None:
    sample = TelemetrySample(
        cpu_percent=1.0,
        rss_bytes=160 * 2**20,
        model=ModelRef(model="m", version=2, variant="fp32"),
        serving_s=12.5,
        model_rss_bytes=100 * 2**20,
    )
    msg = Telemetry(
        ts=1.0,
        seq=0,
        interval_s=10,
        uptime_s=50,
        cpu_percent=1.0,
        rss_bytes=sample.rss_bytes,
        model=sample.model,
        serving_s=sample.serving_s,
        model_rss_bytes=sample.model_rss_bytes,
    )
    again = Telemetry.model_validate_json(msg.model_dump_json())
    assert (again.serving_s, again.model_rss_bytes) == (12.5, 100 * 2**20)
    # a message from an agent before these fields: valid, and the gates fall back (uptime, process RSS)
    old = Telemetry.model_validate_json(
        '{"v": 1, "ts": 1, "seq": 0, "interval_s": 10, "uptime_s": 5, "cpu_percent": 1, "rss_bytes": 5}'
    )
    assert old.serving_s is None and old.model_rss_bytes is None


GATE = {
    "name": "p95_latency_ratio",
    "value": 1.02,
    "low": 0.97,
    "high": 1.08,
    "confidence": 0.95,
    "threshold": 1.2,
    "comparison": "<=",
    "samples": 1200,
    "min_samples": 100,
    "status": "pass",
    "detail": "p95 after/before on 3 devices",
}


def test_the_cli_shows_estimate_interval_and_threshold() -> None:
    assert gate_interval(GATE) == "[0.97, 1.08] @ 95%"
    assert gate_interval({**GATE, "low": None}) == "-"  # not decided on evidence yet (or an old record)
    rollout = {
        "id": "a" * 32,
        "model": "pump",
        "version": 2,
        "selector": "site=berlin",
        "devices": 3,
        "state": "completed",
        "state_since": "2026-12-07T13:00:00",
        "wave_index": 0,
        "reason": "done",
        "waves": [
            {
                "index": 0,
                "name": "all",
                "until": "100%",
                "devices": 3,
                "counts": {"active": 3},
                "succeeded": 3,
                "bake_s": 5,
                "success_threshold": 100,
                "failure_threshold": "1",
                "require_approval": False,
                "status": "done",
            }
        ],
        "gates": [GATE],
        "transitions": [],
    }
    console = Console(width=200, record=True)
    console.print(render(rollout))
    text = console.export_text()
    assert "[0.97, 1.08] @ 95%" in text and "<= 1.2" in text and "1.02" in text
    assert "succeeded 3 (gates passed)" in text

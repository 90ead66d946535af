"""Self-test and shadow runs with real ONNX models on disk, through the agent's ModelHost."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.deploy.disk import DiskSlotStorage
from agent.deploy.record import DiskRecordStore
from agent.deploy.selftest import check_result, sample_record
from agent.deploy.shadow import agreement
from tests.agent.deploy.harness import (
    Artifact,
    Device,
    activate,
    artifact,
    deliver,
    deploy,
    host_ops,
)
from tests.helpers import wait_until
from wire.manifest import Anomaly, Budget, Task
from wire.messages import DeployState, ShadowSpec

S = DeployState


def disk_device(key: Ed25519PrivateKey, root: Path) -> Device:
    d = Device(key, DiskSlotStorage(root), DiskRecordStore(root), make_ops=host_ops)
    d.start()
    return d


def on_v1(key: Ed25519PrivateKey, root: Path, v1: Artifact) -> Device:
    d = disk_device(key, root)
    d.command(deploy(v1, "dep-0"))
    deliver(d, v1)
    assert d.state == S.ACTIVE
    return d


def serving(d: Device) -> tuple[int, str] | None:
    current = d.host.current()
    return (current.ref.version, current.artifact_id) if current is not None and current.ref else None


def test_the_new_model_is_self_tested_switched_and_serves(
    key: Ed25519PrivateKey, data_dir: Path, v1: Artifact, v2: Artifact
) -> None:
    d = on_v1(key, data_dir, v1)
    old = d.host.current()
    d.command(deploy(v2, "dep-2"))
    deliver(d, v2)
    assert d.state == S.ACTIVE and serving(d) == (2, v2.id) and d.active_artifact() == v2.id
    assert d.host.current().bundle_dir == data_dir / "slots" / "b" / "files"  # type: ignore[union-attr]
    result = d.host.current().pipeline.run([{"text": "good great happy"}])[0]  # type: ignore[union-attr]
    assert result["label"] == "positive"
    staged = next(e for e in d.events("dep-2") if e.state == S.STAGED)
    assert staged.metrics["selftest_latency_ms"] > 0 and "selftest_load_ms" in staged.metrics
    assert "selftest_rss_delta_bytes" in staged.metrics
    assert old is not None and getattr(old.pipeline, "session", "open") is None, "the old pipeline was closed"


def test_a_model_that_does_not_load_fails_and_the_old_one_keeps_serving(
    key: Ed25519PrivateKey, data_dir: Path, bundles: dict, v1: Artifact
) -> None:
    files = dict(bundles["v2"], **{"model.onnx": b"\x08\x07 these bytes hash fine but are no ONNX graph" * 40})
    broken = artifact(files, key, version=2)
    d = on_v1(key, data_dir, v1)
    d.command(deploy(broken, "dep-2"))
    deliver(d, broken)
    assert d.record_states()[-3:] == [S.DOWNLOADING, S.VERIFYING, S.FAILED]
    reason = d.events("dep-2")[-1].reason
    assert "self-test failed (load)" in reason and "does not load" in reason
    assert serving(d) == (1, v1.id) and d.active_artifact() == v1.id
    assert [m.version for m in d.manager.installed()] == [1], "the failed candidate is not reported installed"


def test_a_model_over_its_latency_budget_fails(
    key: Ed25519PrivateKey, data_dir: Path, bundles: dict, v1: Artifact
) -> None:
    slow = artifact(bundles["v2"], key, version=2, budget=Budget(max_latency_ms=0.000001))
    d = on_v1(key, data_dir, v1)
    d.command(deploy(slow, "dep-2"))
    deliver(d, slow)
    assert d.state == S.FAILED and "self-test failed (latency)" in d.events("dep-2")[-1].reason
    assert serving(d) == (1, v1.id)


def test_shadow_measures_agreement_on_live_inputs_then_switches(
    key: Ed25519PrivateKey, data_dir: Path, v1: Artifact, v2: Artifact
) -> None:
    d = on_v1(key, data_dir, v1)
    d.command(deploy(v2, "dep-2", shadow=ShadowSpec(sample_rate=1.0, min_samples=6, max_duration_s=60)))
    deliver(d, v2)
    assert d.state == S.SHADOW and serving(d) == (1, v1.id)
    active = d.host.current()
    assert active is not None
    texts = ["good", "bad", "great day", "awful noise", "the pump is ok", "broken valve", "fine", "sad"]
    for text in texts:  # what the inference worker does after each record
        record = {"text": text}
        d.tap.offer(record, active.pipeline.run([record])[0], 0.5)
    wait_until(lambda: d.tick() == S.ACTIVE, 20, what="shadow run finished and switched")
    staged = [e for e in d.events("dep-2") if e.state == S.STAGED][-1]
    m = staged.metrics
    assert m["shadow_samples"] == 6 and m["shadow_errors"] == 0
    assert m["shadow_agreement"] == 1.0, "v2 shifts every logit alike: the same labels"
    assert m["shadow_latency_ms_p95"] >= m["shadow_latency_ms_p50"] > 0 and m["shadow_rss_bytes"] > 0
    assert m["active_latency_ms_p50"] == 0.5, "the active model's latency, for the comparison"
    assert d.record_states()[-5:] == [S.STAGED, S.SHADOW, S.STAGED, S.ACTIVATING, S.ACTIVE]
    assert serving(d) == (2, v2.id)


def test_shadow_without_traffic_ends_at_its_deadline_and_waits_for_activate(
    key: Ed25519PrivateKey, data_dir: Path, v1: Artifact, v2: Artifact
) -> None:
    d = on_v1(key, data_dir, v1)
    d.command(deploy(v2, "dep-2", activate=False, shadow=ShadowSpec(max_duration_s=30)))
    deliver(d, v2)
    assert d.state == S.SHADOW
    d.tick(29)
    assert d.state == S.SHADOW
    d.tick(2)
    wait_until(lambda: d.tick() == S.STAGED, 20, what="shadow run stopped at its deadline")
    assert d.events("dep-2")[-1].metrics["shadow_samples"] == 0
    assert serving(d) == (1, v1.id)
    d.command(activate("dep-2"))
    assert d.state == S.ACTIVE and serving(d) == (2, v2.id)


@pytest.mark.parametrize(
    ("task", "active", "candidate", "expected"),
    [
        (Task.TEXT_CLASSIFICATION, {"label": "a"}, {"label": "a"}, 1.0),
        (Task.TEXT_CLASSIFICATION, {"label": "a"}, {"label": "b"}, 0.0),
        (Task.EMBEDDINGS, {"embedding": [1.0, 0.0]}, {"embedding": [1.0, 1.0]}, math.sqrt(0.5)),
        (Task.ANOMALY, {"anomaly": True, "score": 3.0}, {"anomaly": True, "score": 9.0}, 1.0),
        (Task.TEXT_GENERATION, {"text": "the pump is ok"}, {"text": "the pump was ok"}, 0.75),
        (Task.TEXT2TEXT, {"text": "a b"}, {"error": "boom"}, None),
    ],
)
def test_agreement_by_task(task: Task, active: dict, candidate: dict, expected: float | None) -> None:
    got = agreement(task, active, candidate)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_sample_inputs_and_output_sanity_by_task(v1: Artifact) -> None:
    spec = v1.manifest.run_spec()
    assert sample_record(spec) == {"text": sample_record(spec)["text"]}
    anomaly = spec.model_copy(
        update={"task": Task.ANOMALY, "anomaly": Anomaly(input="x", output="s", n_features=8, threshold=0.0)}
    )
    assert sample_record(anomaly) == {"values": [0.0] * 8}
    assert check_result(spec, {"label": "positive", "score": 0.9, "scores": {}}) is None
    assert "NaN" in (check_result(spec, {"label": "positive", "score": float("nan")}) or "")
    assert "error" in (check_result(spec, {"error": "bad input"}) or "")
    assert "probability" in (check_result(spec, {"label": "x", "score": 7.0}) or "")
    assert "anomaly decision" in (check_result(anomaly, {"score": 1.0}) or "")

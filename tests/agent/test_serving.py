"""The serving engine on real pipelines: micro-batches, the bounded queue, atomic switches, sinks,
streams, drift telemetry, MQTT payloads, model resolution and the memory ceiling."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.inference.bundle import ModelSource, resolve_model
from agent.inference.engine import NO_MODEL, InferenceEngine
from agent.inference.host import Loaded, ModelHost
from agent.inference.inputs import PayloadFormat
from agent.inference.loader import ModelLoader, ModelTooLarge
from agent.inference.session import InputError, ModelLoadError
from agent.inference.sinks import FileSink, Sampler
from agent.telemetry.stats import InferenceCounters
from tests import bundles
from tests.e2e.test_agent_inference import tiny_model
from tests.helpers import wait_until
from tests.registry.tiny_models import text_classifier
from wire.manifest import Manifest, RunSpec, SignedManifest
from wire.messages import ModelRef


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "agent-bundles"


@pytest.fixture(scope="module")
def classifier(cache: Path) -> Path:
    return bundles.build("classification", cache)


@pytest.fixture(scope="module")
def anomaly(cache: Path) -> Path:
    return bundles.build("anomaly", cache)


def load(path: Path, host: ModelHost | None = None) -> Loaded:
    host = host or ModelHost()
    return ModelLoader(host).load(resolve_model(path))


class Results:
    """Collects replies (they arrive in the inference thread)."""

    def __init__(self) -> None:
        self.items: list[tuple[dict[str, Any], ModelRef | None]] = []
        self.lock = threading.Lock()

    def reply(self, result: dict[str, Any], ref: ModelRef | None) -> None:
        with self.lock:
            self.items.append((result, ref))

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


def engine_for(host: ModelHost, **kw: Any) -> tuple[InferenceEngine, InferenceCounters]:
    counters = InferenceCounters()
    return InferenceEngine(host, counters, **kw), counters


def windows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    from benchmarks.seeds.encoders import sensor_windows

    return [{"values": w.tolist()} for w in sensor_windows(n, 32, seed=seed)]


# ---------------------------------------------------------------------------------------------------------
# Micro-batching and the queue


def test_queued_records_are_served_in_micro_batches_of_at_most_max_batch(anomaly: Path) -> None:
    host = ModelHost()
    host.switch(load(anomaly, host))
    engine, counters = engine_for(host, max_batch=16, max_wait_ms=1000, queue_size=100)
    got = Results()
    for record in windows(40):
        assert engine.submit(record, "test", reply=got.reply)
    engine.start()  # everything is already queued: no batch needs to wait
    assert engine.wait_idle(30)
    assert engine.batches == 3  # 16 + 16 + 8
    assert len(got) == 40 and all("score" in r for r, _ in got.items)
    # The batched scores are those of single runs, in order.
    single = [host.current().pipeline.run([w])[0]["score"] for w in windows(40)[:5]]  # type: ignore[union-attr]
    assert [r["score"] for r, _ in got.items[:5]] == pytest.approx(single, abs=1e-6)
    assert counters.snapshot(1.0).count == 40  # type: ignore[union-attr]
    engine.stop()


def test_a_lone_record_waits_at_most_max_wait_where_batching_pays(anomaly: Path, tmp_path: Path) -> None:
    host = ModelHost()
    host.switch(load(anomaly, host))
    engine, _ = engine_for(host, max_batch=16, max_wait_ms=300)
    engine.start()
    got = Results()
    started = time.perf_counter()
    engine.submit(windows(1)[0], "test", reply=got.reply)
    wait_until(lambda: len(got) == 1, 10, what="the lone record served")
    waited = time.perf_counter() - started
    assert 0.3 <= waited < 3.0  # it waited for company, then went alone at the deadline
    # A raw graph runs record by record: batching would not pay, so nothing waits.
    raw = ModelLoader(host).load(resolve_model(tiny_model(tmp_path / "tiny.onnx")))
    host.switch(raw)
    started = time.perf_counter()
    engine.submit({"x": [[1, 2, 3, 4]]}, "test", reply=got.reply)
    wait_until(lambda: len(got) == 2, 10, what="the raw record served")
    assert time.perf_counter() - started < 0.3
    assert got.items[1][0] == {"y": [[60.5, 0.0, 81.0]]}
    engine.stop()


def test_a_full_queue_refuses_and_counts_drops_but_files_wait(classifier: Path) -> None:
    host = ModelHost()
    host.switch(load(classifier, host))
    engine, counters = engine_for(host, queue_size=5)
    accepted = [engine.submit({"text": f"good {i}"}, "mqtt:t") for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3
    assert not engine.submit_many([{"text": "a"}, {"text": "b"}], "http", [lambda r, m: None] * 2)
    assert counters.total_drops == 5
    # A blocking producer (a file) waits for room instead of dropping.
    blocked = threading.Thread(target=engine.submit, args=({"text": "ok"}, "file:x"), kwargs={"block": True})
    blocked.start()
    stats = counters.snapshot(1.0, queue_depth=engine.depth)
    assert stats is not None and stats.drops == 5 and stats.queue_depth == 5
    engine.start()
    blocked.join(10)
    assert not blocked.is_alive()
    assert engine.wait_idle(10) and engine.processed == 6
    assert counters.total_drops == 5
    engine.stop()


def test_no_model_answers_every_record_with_an_error_and_counts_it_a_drop_not_a_model_error() -> None:
    # a device that boots or switches while inputs arrive must not charge its model's error rate (a rollout gate)
    engine, counters = engine_for(ModelHost())
    engine.start()
    got = Results()
    engine.submit({"text": "x"}, "test", reply=got.reply)
    assert engine.wait_idle(10)
    assert got.items == [({"error": NO_MODEL}, None)]
    assert counters.total_errors == 0 and counters.total_drops == 1
    engine.stop()


# ---------------------------------------------------------------------------------------------------------
# Atomic switches


def _other_classifier(classifier: Path, tmp_path: Path) -> tuple[RunSpec, Path]:
    """Another classifier with other label names, so each result tells which model made it."""
    root = text_classifier(tmp_path / "other", labels=("bad", "good"))
    first = resolve_model(classifier)
    assert first.spec is not None
    post = first.spec.postprocess.model_copy(update={"labels": ["bad", "good"]})
    return first.spec.model_copy(update={"postprocess": post}), root


def test_switching_models_under_load_loses_and_splits_nothing(classifier: Path, tmp_path: Path) -> None:
    host = ModelHost()
    other_spec, other_root = _other_classifier(classifier, tmp_path)
    other_ref = ModelRef(model="other", version=1, variant="fp32")
    source = resolve_model(classifier)
    served: list[Loaded] = [load(classifier, host)]
    host.switch(served[0])
    engine, counters = engine_for(host, max_batch=8, max_wait_ms=1, queue_size=10_000)
    engine.start()
    got = Results()
    # At least 1,500 records, and on until more than 10 switches happened under them: how many records a
    # switch takes depends on the machine's load, so the count follows the switches (bounded: 30,000, 120 s).
    produced = [0]
    deadline = time.monotonic() + 120

    def produce() -> None:
        for i in range(30_000):
            if i >= 1500 and (len(served) > 10 or time.monotonic() > deadline):
                break
            text = "good device" if i % 2 else "bad pump"
            engine.submit({"text": text, "id": i}, "test", reply=got.reply, block=True)
            produced[0] = i + 1

    producer = threading.Thread(target=produce)
    producer.start()
    while producer.is_alive() or engine.depth:
        # What a deployment does: load the next model beside the active one, then switch.
        if len(served) % 2:
            nxt = host.load(other_spec, other_root, other_ref)
        else:
            nxt = ModelLoader(host).load(source, warmup=False)
        host.switch(nxt)
        served.append(nxt)
    producer.join()
    assert engine.wait_idle(60)
    engine.stop()
    assert len(served) > 10
    n = produced[0]
    assert len(got) == n and counters.total_errors == 0
    labels_of = {"tiny-sentiment": {"negative", "positive"}, "other": {"bad", "good"}}
    seen = set()
    for result, ref in got.items:
        assert ref is not None
        # Each result comes from one model, and the reply names that model: no batch ran on two.
        assert set(result["scores"]) == labels_of[ref.model]
        seen.add(ref.model)
    assert seen == {"tiny-sentiment", "other"}
    host.switch(None)
    assert all(getattr(loaded.pipeline, "session") is None for loaded in served)  # noqa: B009  # every retired pipeline closed once idle


# ---------------------------------------------------------------------------------------------------------
# Results, sinks, drift telemetry


def test_results_go_to_the_file_sink_with_ids_and_without_inputs(classifier: Path, tmp_path: Path) -> None:
    host = ModelHost()
    host.switch(load(classifier, host))
    for include in (False, True):
        path = tmp_path / f"results-{include}.jsonl"
        engine, _ = engine_for(host, sinks=[FileSink(path)], include_input=include)
        tapped: list[tuple[Any, str, float]] = []

        def tap(record: Any, result: dict[str, Any], latency: float, seen: list[Any] = tapped) -> None:
            seen.append((record, result["label"], latency))

        engine.taps.append(tap)
        engine.start()
        engine.submit({"text": "good great happy", "id": "r-1"}, "file:in.jsonl")
        engine.submit({"text": "bad awful", "id": 7}, "mqtt:sensors/a")
        engine.submit({"text": "fine"}, "http", to_sinks=False, reply=lambda r, m: None)
        assert engine.wait_idle(10)
        engine.stop()
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(o["source"], o.get("id")) for o in lines] == [("file:in.jsonl", "r-1"), ("mqtt:sensors/a", 7)]
        assert lines[0]["model"] == {"model": "tiny-sentiment", "version": 3, "variant": "fp32"}
        assert [o["result"]["label"] for o in lines] == ["positive", "negative"]
        # Taps (the deployment's shadow run) see every record with its result, HTTP ones included.
        assert [(r["text"], label) for r, label, _ in tapped] == [
            ("good great happy", "positive"),
            ("bad awful", "negative"),
            ("fine", "positive"),
        ]
        assert all(latency > 0 for _, _, latency in tapped)
        assert all(o["latency_ms"] > 0 and o["seq"] >= 1 for o in lines)
        if include:
            assert lines[0]["input"] == {"text": "good great happy", "id": "r-1"}
        else:
            assert all("input" not in o for o in lines)  # raw inputs stay on the device


def test_sampling_keeps_an_exact_fraction() -> None:
    sampler = Sampler(0.25)
    assert sum(sampler.keep() for _ in range(1000)) == 250
    assert sum(Sampler(1.0).keep() for _ in range(10)) == 10
    assert sum(Sampler(0.0).keep() for _ in range(10)) == 0


def test_drift_signals_count_labels_and_scores_never_inputs(classifier: Path, anomaly: Path) -> None:
    host = ModelHost()
    host.switch(load(classifier, host))
    engine, counters = engine_for(host)
    engine.start()
    for text in ["good great", "happy fine", "bad awful", "broken"]:
        engine.submit({"text": text}, "test")
    engine.submit({"nope": 1}, "test")
    assert engine.wait_idle(10)
    stats = counters.snapshot(2.0)
    assert stats is not None and stats.count == 4 and stats.errors == 1
    assert stats.drift is not None and stats.drift.label_counts == {"positive": 2, "negative": 2}
    assert sum(stats.drift.score_hist) == 4 and len(stats.drift.score_edges) == len(stats.drift.score_hist) + 1
    assert stats.throughput_per_s == pytest.approx(2.0)
    assert stats.latency is not None and 0 < stats.latency.p50_ms <= stats.latency.p99_ms
    assert "good great" not in stats.model_dump_json()
    host.switch(load(anomaly, host))
    normal = windows(6)
    spiked = [{"values": [v + (40.0 if i == 5 else 0.0) for i, v in enumerate(w["values"])]} for w in normal[:2]]
    for record in normal + spiked:
        engine.submit(record, "test")
    assert engine.wait_idle(10)
    stats = counters.snapshot(1.0)
    assert stats is not None and stats.drift is not None
    assert stats.drift.label_counts.get("anomaly", 0) >= 2
    assert sum(stats.drift.label_counts.values()) == 8
    engine.stop()


def test_label_histogram_is_bounded() -> None:
    counters = InferenceCounters()
    for i in range(400):
        counters.record_label(f"l{i}")
        counters.record(1.0)
    stats = counters.snapshot(1.0)
    assert stats is not None and stats.drift is not None
    assert len(stats.drift.label_counts) == 256 and stats.drift.label_counts["(other)"] == 145


# ---------------------------------------------------------------------------------------------------------
# MQTT payloads


def test_payload_formats_find_the_record() -> None:
    window = {"sensor": "t-7", "data": {"readings": [1.0, 2.0]}, "batch": [{"text": "a"}]}
    payload = json.dumps(window).encode()
    assert PayloadFormat(path="data.readings", key="values", id_path="sensor").record(payload) == {
        "values": [1.0, 2.0],
        "id": "t-7",
    }
    assert PayloadFormat(path="batch.0").record(payload) == {"text": "a"}
    assert PayloadFormat().record(b'{"text": "whole"}') == {"text": "whole"}
    assert PayloadFormat(format="text").record("grüße".encode()) == {"text": "grüße"}
    assert PayloadFormat(format="text", key="prompt").record(b"go") == {"prompt": "go"}
    with pytest.raises(InputError, match="nothing at 'data.missing'"):
        PayloadFormat(path="data.missing").record(payload)
    with pytest.raises(InputError, match="set mqtt_input_key"):
        PayloadFormat(path="data.readings").record(payload)
    with pytest.raises(InputError, match="not JSON"):
        PayloadFormat().record(b"\xff{")
    with pytest.raises(InputError, match="not UTF-8"):
        PayloadFormat(format="text").record(b"\xff")


# ---------------------------------------------------------------------------------------------------------
# What --model accepts


def test_model_sources_of_every_kind(classifier: Path, anomaly: Path, tmp_path: Path) -> None:
    raw = resolve_model(tiny_model(tmp_path / "m.onnx"))
    assert raw.spec is None and raw.ref is None and raw.graph_files() == [tmp_path / "m.onnx"]
    described = resolve_model(classifier)
    manifest = Manifest.model_validate_json((classifier / "manifest.json").read_text())
    assert described.ref == ModelRef(model="tiny-sentiment", version=3, variant="fp32")
    assert described.artifact_id == manifest.artifact_id and described.spec == manifest.run_spec()
    anonymous = resolve_model(anomaly)
    assert anonymous.ref is None and anonymous.spec is not None and anonymous.spec.task.value == "anomaly"
    signed_dir = bundles.build("embeddings", classifier.parent)
    signed = SignedManifest.model_validate_json((signed_dir / "manifest.json").read_text())
    source = resolve_model(signed_dir)
    assert source.ref == ModelRef(model="minilm", version=1, variant="int8")
    assert source.artifact_id == signed.manifest.artifact_id


def test_model_sources_that_cannot_serve_say_why(classifier: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not an .onnx graph"):
        resolve_model(tmp_path / "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="without manifest.json or slmfleet.json"):
        resolve_model(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in classifier.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="differ in size.*tokenizer.json"):
        resolve_model(broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="lacks files.*tokenizer.json"):
        resolve_model(broken)
    (broken / "manifest.json").write_text('{"model": "x"}')
    with pytest.raises(ModelLoadError, match="not a valid manifest"):
        resolve_model(broken)


# ---------------------------------------------------------------------------------------------------------
# The memory ceiling


def test_a_model_over_the_memory_ceiling_is_refused_and_the_active_one_stays(classifier: Path) -> None:
    host = ModelHost()
    active = load(classifier, host)
    host.switch(active)
    fp32 = resolve_model(bundles.minilm_fp32_bundle(classifier.parent))
    weights = ModelLoader(host).estimate_bytes(fp32)
    assert weights > 80 * 2**20  # MiniLM fp32: ~90 MB of weights
    with pytest.raises(ModelTooLarge, match=r"needs at least \d+ MiB \(its weights\).*ceiling for a model is 50 MiB"):
        ModelLoader(host, max_rss_bytes=50 * 2**20).load(fp32)
    # Within the estimate but not the measurement: loaded, measured, refused and closed.
    limit = weights + 2**20
    loader = ModelLoader(host, max_rss_bytes=limit)
    with pytest.raises(ModelTooLarge, match="took \\d+ MiB once loaded") as refused:
        loader.load(fp32)
    assert refused.value.needed_bytes > limit
    assert host.current() is active and getattr(active.pipeline, "session") is not None  # noqa: B009
    ok = ModelLoader(host, max_rss_bytes=1024 * 2**20).load(fp32)
    assert ok.pipeline.run([{"text": "fits"}])[0]["embedding"]
    host.discard(ok)


def test_estimates_count_external_weights(tmp_path: Path) -> None:
    graph = tiny_model(tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").write_bytes(np.zeros(1000, dtype=np.float32).tobytes())
    source = ModelSource(path=graph, spec=None)
    assert ModelLoader(ModelHost()).estimate_bytes(source) == graph.stat().st_size + 4000


def test_sessions_do_not_spin_unless_told(tmp_path: Path) -> None:
    from agent.inference.session import configure_sessions, load_session

    graph = tiny_model(tmp_path / "m.onnx")
    entry = "session.intra_op.allow_spinning"
    assert load_session(graph).get_session_options().get_session_config_entry(entry) == "0"
    configure_sessions(allow_spinning=True)
    try:
        assert load_session(graph).get_session_options().get_session_config_entry(entry) == "1"
    finally:
        configure_sessions(allow_spinning=False)

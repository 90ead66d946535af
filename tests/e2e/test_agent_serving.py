"""Every pipeline family served end to end by the agent process through every input kind at once:
a JSON-lines file, stdin, an MQTT input topic and the local HTTP endpoint, with results to a file and
to the device's MQTT results topic, and telemetry carrying the model, latency, drift and tokens."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.broker.embedded import EmbeddedBroker, free_port
from tests import bundles
from tests.helpers import Proc, RawMqtt, slmfleet_cmd, wait_until
from wire import topics


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "agent-bundles"


def _windows() -> tuple[list[list[float]], list[list[float]]]:
    from benchmarks.seeds.encoders import inject_anomalies, sensor_windows

    normal = sensor_windows(40, 32, seed=7)
    broken = inject_anomalies(normal[:4], seed=3)
    return [w.tolist() for w in normal], [w.tolist() for w in broken]


@dataclass
class Family:
    """How to feed one pipeline family and what its results must look like."""

    records: list[dict[str, Any]]
    #: MQTT payloads on the input topic, with the flags that tell the agent where the record is in them
    payloads: list[bytes]
    mqtt_flags: list[str]
    check: Callable[[dict[str, Any], dict[str, Any]], None]
    ref: dict[str, Any] | None
    streams: bool = False
    extra_flags: list[str] = field(default_factory=list)
    #: the records the agent finds in ``payloads`` (default: ``records``)
    mqtt_records: list[dict[str, Any]] | None = None


def _check_classification(record: dict[str, Any], result: dict[str, Any]) -> None:
    assert set(result) == {"label", "score", "scores", "logits"}
    assert len(result["logits"]) == len(result["scores"])
    if "good" in record["text"]:
        assert result["label"] == "positive"
    if "awful" in record["text"]:
        assert result["label"] == "negative"


def _check_embeddings(record: dict[str, Any], result: dict[str, Any]) -> None:
    vector = result["embedding"]
    assert len(vector) == 384 and math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, abs_tol=1e-3)
    # Real MiniLM weights: the zero-shot label follows the meaning.
    if "pump" in record["text"]:
        assert result["label"] == "maintenance"
    if "rain" in record["text"]:
        assert result["label"] == "weather"


def _check_anomaly(record: dict[str, Any], result: dict[str, Any]) -> None:
    assert isinstance(result["score"], float) and isinstance(result["anomaly"], bool)
    if max(record["values"]) - min(record["values"]) > 5:  # a spike, a shift or a dropout
        assert result["anomaly"] is True


def _check_generated(limit: int) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    def check(record: dict[str, Any], result: dict[str, Any]) -> None:
        assert isinstance(result["text"], str) and 1 <= result["tokens"] <= record.get("max_new_tokens", limit)

    return check


def family(name: str) -> Family:
    if name == "classification":
        texts = ["good great happy", "bad awful broken", "the pump is ok"]
        return Family(
            [{"text": t} for t in texts],
            [t.encode() for t in texts],
            ["--mqtt-input-format", "text", "--mqtt-input-key", "text"],
            _check_classification,
            {"model": "tiny-sentiment", "version": 3, "variant": "fp32"},
        )
    if name == "embeddings":
        texts = ["the pump needs repair, it leaks oil", "heavy rain and cold wind all day", "hello"]
        return Family(
            [{"text": t} for t in texts],
            [json.dumps({"id": f"m{i}", "msg": {"body": t}}).encode() for i, t in enumerate(texts)],
            ["--mqtt-input-path", "msg.body", "--mqtt-input-key", "text", "--mqtt-input-id-path", "id"],
            _check_embeddings,
            {"model": "minilm", "version": 1, "variant": "int8"},
        )
    if name == "anomaly":
        normal, broken = _windows()
        values = [normal[0], broken[0], broken[1]]
        return Family(
            [{"values": v} for v in values],
            [json.dumps({"sensor": f"t{i}", "window": v}).encode() for i, v in enumerate(values)],
            ["--mqtt-input-path", "window", "--mqtt-input-key", "values", "--mqtt-input-id-path", "sensor"],
            _check_anomaly,
            None,  # a bare RunSpec bundle: anonymous
        )
    if name == "generation":
        prompts = ["the valve at", "pressure report", "alarm"]
        return Family(
            [{"prompt": p, "max_new_tokens": 6} for p in prompts],
            [p.encode() for p in prompts],
            ["--mqtt-input-format", "text", "--mqtt-input-key", "prompt"],
            _check_generated(16),
            {"model": "tiny-llama", "version": 1, "variant": "fp32"},
            streams=True,
            mqtt_records=[{"prompt": p} for p in prompts],  # the manifest's max_new_tokens (16) applies
        )
    assert name == "text2text"
    texts = ["translate: the pump", "summarize: the pressure is high", "hello"]
    return Family(
        [{"text": t, "max_new_tokens": 4} for t in texts],
        [json.dumps({"text": t, "max_new_tokens": 4, "id": f"m{i}"}).encode() for i, t in enumerate(texts)],
        [],  # the payload is the record itself
        _check_generated(8),
        None,
        streams=True,
    )


class Agent:
    """The agent process with every input kind, watched by a raw MQTT subscriber."""

    def __init__(self, tmp: Path, broker: EmbeddedBroker, device_id: str, model: Path, fam: Family) -> None:
        self.device_id = device_id
        self.input_topic = f"gw/{device_id}/in"
        self.results = tmp / "results.jsonl"
        self.file_input = tmp / "in.jsonl"
        self.file_input.write_text("".join(json.dumps({**r, "id": f"f{i}"}) + "\n" for i, r in enumerate(fam.records)))
        self.watch = RawMqtt(broker.port, client_id=f"watch-{device_id}")
        self.watch.subscribe(f"{topics.DEVICE_PREFIX}/{device_id}/#")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = [
            "agent",
            *("--broker", broker.url, "--device-id", device_id, "--data-dir", str(tmp / "data")),
            *("--model", str(model), "--input", str(self.file_input), "--input", "-"),
            *("--mqtt-input-topic", self.input_topic, *fam.mqtt_flags),
            *("--http-port", str(port), "--results", str(self.results), "--results-mqtt"),
            *("--telemetry-interval", "0.3", "--reconnect-max", "1", *fam.extra_flags),
        ]
        self.proc = Proc(slmfleet_cmd(*args), tmp / "agent.log", stdin=True)

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/v1/health", timeout=5).json()

    def messages(self, channel: str) -> list[dict[str, Any]]:
        prefix = f"{topics.DEVICE_PREFIX}/{self.device_id}/{channel}"
        return [json.loads(p) for t, p, _ in self.watch.received(prefix) if t == prefix]

    def file_results(self) -> list[dict[str, Any]]:
        if not self.results.is_file():
            return []
        return [json.loads(line) for line in self.results.read_text().splitlines()]

    def close(self) -> int:
        code = self.proc.stop(20)
        self.watch.close()
        return code


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        if agent.proc.alive():
            agent.close()


def sse_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    events, kind = [], "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: ") :])))
            kind = "message"
    return events


@pytest.mark.parametrize("name", bundles.FAMILIES)
def test_every_input_kind_serves_the_family(
    name: str, cache: Path, tmp_path: Path, broker: EmbeddedBroker, agents: list[Agent]
) -> None:
    fam = family(name)
    model = bundles.build(name, cache)
    agent = Agent(tmp_path, broker, f"serve-{name}", model, fam)
    agents.append(agent)
    wait_until(lambda: agent.health()["serving"], 60, what=f"{name} agent serving (log: {agent.proc.log_path})")

    # stdin and MQTT, while the file is being served
    agent.proc.write_stdin("".join(json.dumps({**r, "id": f"s{i}"}) + "\n" for i, r in enumerate(fam.records)))
    for payload in fam.payloads:
        agent.watch.publish(agent.input_topic, payload, qos=1)

    # HTTP: one record, a list, and (generation) a stream
    one = httpx.post(agent.url + "/v1/infer", json=fam.records[0], timeout=60)
    assert one.status_code == 200, one.text
    fam.check(fam.records[0], one.json()["result"])
    assert one.json()["model"] == fam.ref
    many = httpx.post(agent.url + "/v1/infer", json=fam.records[1:], timeout=60).json()["results"]
    for record, result in zip(fam.records[1:], many, strict=True):
        fam.check(record, result)
    http_count = 1 + len(fam.records[1:])
    if fam.streams:
        with httpx.stream("POST", agent.url + "/v1/infer", json={**fam.records[0], "stream": True}, timeout=60) as r:
            events = sse_events(r)
        assert events[-1][0] == "done" and events[-1][1]["text"] == "".join(e["text"] for _, e in events[:-1])
        http_count += 1

    n = 3 * len(fam.records)
    wait_until(lambda: len(agent.file_results()) == n, 60, what=f"{n} results in the results file")
    wait_until(lambda: len(agent.messages("results")) == n, 30, what=f"{n} results on the results topic")
    by_source: Counter[str] = Counter()
    for out in agent.file_results():
        by_source[out["source"]] += 1
        assert "input" not in out and "error" not in out["result"], out  # raw inputs stay on the device
        assert out.get("model") == fam.ref
    assert by_source == {f"file:{agent.file_input}": 3, "stdin": 3, f"mqtt:{agent.input_topic}": 3}
    mqtt_out = agent.messages("results")
    assert sorted(o["seq"] for o in mqtt_out) == sorted(o["seq"] for o in agent.file_results())
    records = {f"f{i}": r for i, r in enumerate(fam.records)} | {f"s{i}": r for i, r in enumerate(fam.records)}
    for out in mqtt_out:
        if not out["source"].startswith("mqtt:"):
            fam.check(records[out["id"]], out["result"])
    # MQTT inputs are served in the order they were published.
    from_mqtt = sorted((o for o in mqtt_out if o["source"].startswith("mqtt:")), key=lambda o: o["seq"])
    for record, out in zip(fam.mqtt_records or fam.records, from_mqtt, strict=True):
        fam.check(record, out["result"])
    if name != "classification" and name != "generation":  # these send plain text: no id to echo
        assert [o["id"] for o in from_mqtt] == [f"{'t' if name == 'anomaly' else 'm'}{i}" for i in range(3)]

    # Telemetry: every inference counted, with the model it ran on and the task's own signals.
    def counted() -> int:
        return sum((t.get("inference") or {}).get("count", 0) for t in agent.messages("telemetry"))

    wait_until(lambda: counted() == n + http_count, 30, what=f"{n + http_count} inferences in telemetry")
    busy = [t for t in agent.messages("telemetry") if (t.get("inference") or {}).get("count")]
    assert all(t.get("model") == fam.ref for t in busy)
    assert all(t["inference"]["latency"]["p50_ms"] > 0 for t in busy)
    drift_labels: Counter[str] = Counter()
    for t in busy:
        drift_labels.update((t["inference"].get("drift") or {}).get("label_counts", {}))
    if name == "classification":
        assert set(drift_labels) <= {"positive", "negative"} and sum(drift_labels.values()) == n + http_count
    if name == "embeddings":
        assert set(drift_labels) <= {"maintenance", "weather"} and drift_labels["maintenance"] >= 3
    if name == "anomaly":
        assert drift_labels["anomaly"] >= 6
    if fam.streams:
        assert sum(t["inference"].get("tokens", 0) for t in busy) > 0
        assert any(t["inference"].get("tokens_per_s") for t in busy)

    # Closing stdin ends that input: both finite inputs report it, durably.
    assert agent.proc.popen.stdin is not None
    agent.proc.popen.stdin.close()
    wait_until(
        lambda: len([e for e in agent.messages("events") if e.get("kind") == "input_done"]) == 2,
        30,
        what="input_done events for the file and stdin",
    )
    loaded = [e for e in agent.messages("events") if e.get("kind") == "model_loaded"]
    assert len(loaded) == 1 and "MiB" in loaded[0]["message"]
    births = [m for m in agent.messages("state") if m["type"] == "online"]
    if fam.ref is not None:
        installed = births[-1]["installed"]
        assert [{k: i[k] for k in ("model", "version", "variant")} for i in installed] == [fam.ref]
    assert {"task:text-generation", "input:http", "input:mqtt"} <= set(births[-1]["capabilities"])
    assert agent.close() == 0


def test_a_model_over_the_memory_ceiling_is_refused_with_a_clear_error(
    cache: Path, tmp_path: Path, broker: EmbeddedBroker, agents: list[Agent]
) -> None:
    fam = family("embeddings")
    fam.extra_flags = ["--model-max-rss-mib", "5"]
    agent = Agent(tmp_path, broker, "ceiling-1", bundles.build("embeddings", cache), fam)
    agents.append(agent)
    wait_until(lambda: agent.health()["status"] == "ok", 60, what="agent up")
    errors = wait_until(
        lambda: [e for e in agent.messages("events") if e.get("kind") == "error"], 30, what="an error event"
    )
    assert "minilm v1 (int8) needs at least 22 MiB" in errors[0]["message"]
    assert "memory ceiling for a model is 5 MiB" in errors[0]["message"]
    assert agent.health()["serving"] is False
    r = httpx.post(agent.url + "/v1/infer", json={"text": "x"}, timeout=10)
    assert r.status_code == 503 and r.json()["error"] == "no model is loaded"
    assert agent.close() == 0

"""The local HTTP endpoint on a real engine and real pipelines: records, lists, streams, errors, limits."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.inference.bundle import resolve_model
from agent.inference.engine import InferenceEngine
from agent.inference.host import ModelHost
from agent.inference.http import HttpFrontend
from agent.inference.loader import ModelLoader
from agent.runtime.config import AgentSettings
from agent.telemetry.stats import InferenceCounters
from tests import bundles
from tests.helpers import LoopThread


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "agent-bundles"


class Served:
    def __init__(self, host: ModelHost, queue_size: int = 256, start_engine: bool = True) -> None:
        self.host = host
        self.counters = InferenceCounters()
        self.engine = InferenceEngine(host, self.counters, queue_size=queue_size, max_wait_ms=2)
        if start_engine:
            self.engine.start()
        self.loop = LoopThread()
        self.http = HttpFrontend(self.engine, port=0, max_body_bytes=4096, max_records=8, health=lambda: {"ok": 1})
        port = self.loop.run(self.http.start())
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def close(self) -> None:
        self.client.close()
        self.loop.run(self.http.close())
        self.loop.close()
        self.engine.stop()


@pytest.fixture(scope="module")
def classifier_host(cache: Path) -> ModelHost:
    host = ModelHost()
    host.switch(ModelLoader(host).load(resolve_model(bundles.build("classification", cache))))
    return host


@pytest.fixture
def served(classifier_host: ModelHost) -> Iterator[Served]:
    s = Served(classifier_host)
    yield s
    s.close()


def test_one_record_and_a_list(served: Served) -> None:
    r = served.client.post("/v1/infer", json={"text": "good great day", "id": "a"})
    assert r.status_code == 200
    body = r.json()
    assert body["result"]["label"] == "positive" and body["latency_ms"] > 0
    assert body["model"] == {"model": "tiny-sentiment", "version": 3, "variant": "fp32"}
    r = served.client.post("/v1/infer", json=[{"text": "bad awful"}, {"txt": "typo"}, {"text": "happy"}])
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x.get("label") for x in results] == ["negative", None, "positive"]
    assert "no 'text' field" in results[1]["error"]
    assert served.counters.total_count == 3 and served.counters.total_errors == 1


def test_errors_and_limits(served: Served) -> None:
    c = served.client
    r = c.post("/v1/infer", json={"txt": "typo"})
    assert r.status_code == 400 and "no 'text' field" in r.json()["error"]
    assert c.post("/v1/infer", content=b"{not json").status_code == 400
    assert c.post("/v1/infer", json="just a string").status_code == 400
    assert c.post("/v1/infer", json=[]).status_code == 400
    assert c.post("/v1/infer", json=[{"text": "x"}] * 9).status_code == 413  # max_records 8
    r = c.post("/v1/infer", json={"text": "x" * 5000})  # max_body_bytes 4096
    assert r.status_code == 413 and "exceeds 4096" in r.json()["error"]
    assert c.get("/v1/infer").status_code == 405
    assert c.post("/v1/health").status_code == 405
    assert c.get("/v1/other").status_code == 404
    assert c.get("/v1/health").json() == {"ok": 1}
    r = c.post("/v1/infer", json={"text": "good", "stream": True})
    assert r.status_code == 400 and "streaming is for text generation" in r.json()["error"]


def test_keep_alive_serves_several_requests_on_one_connection(served: Served) -> None:
    port = int(served.url.rsplit(":", 1)[1])
    body = json.dumps({"text": "fine"}).encode()
    request = (
        f"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")
        for _ in range(3):
            sock.sendall(request)
            status = f.readline()
            headers = {}
            while (line := f.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                headers[k.lower()] = v.strip()
            payload = json.loads(f.read(int(headers["content-length"])))
            assert status.startswith(b"HTTP/1.1 200") and headers["connection"] == "keep-alive"
            assert payload["result"]["label"] == "positive"
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert f.readline().startswith(b"HTTP/1.1 400")


def test_no_model_and_a_full_queue_are_503() -> None:
    empty = Served(ModelHost())
    try:
        r = empty.client.post("/v1/infer", json={"text": "x"})
        assert r.status_code == 503 and r.json()["error"] == "no model is loaded"
        assert empty.client.post("/v1/infer", json=[{"text": "x"}]).status_code == 503
    finally:
        empty.close()
    stalled = Served(ModelHost(), queue_size=1, start_engine=False)  # nothing drains the queue
    try:
        r = stalled.client.post("/v1/infer", json=[{"text": "a"}, {"text": "b"}])
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert stalled.counters.total_drops == 2
    finally:
        stalled.close()


def test_the_endpoint_is_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback only"):
        HttpFrontend(InferenceEngine(ModelHost(), InferenceCounters()), host="0.0.0.0")
    with pytest.raises(ValueError, match="not a loopback address"):
        AgentSettings.model_validate({"device_id": "d", "http_host": "192.168.1.2", "http_port": 8080})
    assert AgentSettings.model_validate({"device_id": "d", "http_host": "::1"}).http_host == "::1"


def sse_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    events, kind = [], "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: ") :])))
            kind = "message"
    return events


def test_generation_streams_tokens_as_server_sent_events(cache: Path) -> None:
    host = ModelHost()
    loaded = ModelLoader(host).load(resolve_model(bundles.build("generation", cache)))
    host.switch(loaded)
    s = Served(host)
    try:
        record = {"prompt": "the sensor in the north", "max_new_tokens": 12}
        expected = loaded.pipeline.run([record])[0]
        with s.client.stream("POST", "/v1/infer", json={**record, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["transfer-encoding"] == "chunked"
            events = sse_events(r)
        pieces = [e["text"] for kind, e in events if kind == "message"]
        assert len(pieces) >= 2  # tokens came one by one, not as one answer
        kind, done = events[-1]
        assert kind == "done" and done["text"] == "".join(pieces) == expected["text"]
        assert 1 <= done["tokens"] <= 12
        stats = s.counters.snapshot(1.0)
        assert stats is not None and stats.tokens == done["tokens"] and stats.tokens_per_s
        # Non-streamed generation answers at once, with the token count.
        r = s.client.post("/v1/infer", json=record)
        assert r.json()["result"] == expected
        r = s.client.post("/v1/infer", json={"prompt": "x", "max_new_tokens": 0, "stream": True})
        assert r.status_code == 400 and "max_new_tokens" in r.json()["error"]
    finally:
        s.close()
        host.switch(None)

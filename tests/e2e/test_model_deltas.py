"""Model deltas on real agent processes: the controller (``slmfleet up``) delivers v1 of a classifier, then v2
whose classification head alone was fine-tuned. A device that runs v1 copies every chunk v2 shares with it and
receives only the few it lacks (the head, stored last: the broadcast starts there), counted by the
controller's ``slmfleet_chunk_bytes_published_total``; its installed file is byte-identical to v2's and
serves. A device without v1 gets the full artifact from the broadcast, and a device whose installed v1 rotted
on disk copies nothing it cannot verify: it lacks a scattered chunk besides the head, so it goes sparse
(``agent/deploy/delta.py``) and asks for those alone; the result is still exactly v2."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from controller.broker.embedded import free_port
from tests.e2e.fleet import ControllerProc, Fleet
from tests.helpers import metric_value, wait_until
from tests.registry.tiny_models import WORDS, word_tokenizer

pytestmark = pytest.mark.slow

CHUNK = 4096
DIM = 192


def classifier(out_dir: Path, head_seed: int) -> Path:
    """A text classifier with a body (embeddings, two dense layers: ~330 KB) and a small head, stored last
    as exporters store it; ``head_seed`` changes the head's weights alone (a head-only fine-tune)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vocab = len(WORDS) + 2
    emb = rng.normal(0, 0.5, (vocab, DIM)).astype(np.float32)
    body1 = rng.normal(0, 0.1, (DIM, DIM)).astype(np.float32)
    body2 = rng.normal(0, 0.1, (DIM, DIM)).astype(np.float32)
    head = np.random.default_rng(100 + head_seed).normal(0, 0.1, (DIM, 2)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["tok", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_f", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "body1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "body2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("MatMul", ["a2", "head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "delta-classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[
            onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
            onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            onnx.numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"),
            onnx.numpy_helper.from_array(emb, "emb"),
            onnx.numpy_helper.from_array(body1, "body1"),
            onnx.numpy_helper.from_array(body2, "body2"),
            onnx.numpy_helper.from_array(head, "head"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, out_dir / "model.onnx")
    word_tokenizer(out_dir / "tokenizer.json")
    (out_dir / "config.json").write_text(json.dumps({"id2label": {"0": "negative", "1": "positive"}}))
    return out_dir


def register(ctl: ControllerProc, bundle: Path) -> dict[str, Any]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(bundle, arcname="b")
    r = httpx.post(
        ctl.api + "/api/v1/models/clf/versions",
        files=[("file", ("b.tar", buf.getvalue()))],
        data={"options": json.dumps({"task": "text-classification"})},
        headers=ctl.auth,
        timeout=300,
    )
    assert r.status_code == 201, r.text
    return next(v for v in r.json()["variants"] if v["variant"] == "fp32")  # type: ignore[no-any-return]


def deploy_and_wait(ctl: ControllerProc, version: int, device: str) -> dict[str, Any]:
    body = {"model": "clf", "version": version, "variant": "fp32", "target": {"devices": [device]}}
    r = httpx.post(ctl.api + "/api/v1/deployments", json=body, headers=ctl.auth, timeout=10)
    assert r.status_code == 201, r.text
    dep = r.json()["id"]
    done: dict[str, Any] = wait_until(
        lambda: (d := ctl.get(f"/api/v1/deployments/{dep}").json())["status"] in ("completed", "failed") and d,
        90,
        what=f"v{version} on {device}",
    )
    assert done["status"] == "completed", done
    return done


def published(ctl: ControllerProc) -> tuple[float, float]:
    """Chunk bytes (frames included) the controller published by broadcast and by repair so far."""
    text = ctl.get("/metrics").text
    return (
        metric_value(text, "slmfleet_chunk_bytes_published_total", {"kind": "broadcast"}),
        metric_value(text, "slmfleet_chunk_bytes_published_total", {"kind": "repair"}),
    )


def installed(root: Path, device: str) -> dict[str, bytes]:
    slots = root / device / "deploy" / "slots"
    active = (slots / "active").read_text().strip()
    files = slots / active / "files"
    return {p.relative_to(files).as_posix(): p.read_bytes() for p in files.rglob("*") if p.is_file()}


def test_a_head_only_fine_tune_ships_a_few_chunks_and_installs_exactly_v2(fleet: Fleet, tmp_path: Path) -> None:
    ctl = fleet.start_controller(env={"SLMFLEET_CHUNK_SIZE": str(CHUNK)})
    v1 = register(ctl, classifier(tmp_path / "v1", head_seed=1))
    v2 = register(ctl, classifier(tmp_path / "v2", head_seed=2))
    manifest = ctl.get(f"/api/v1/artifacts/{v2['artifact_id']}/manifest").json()["manifest"]
    size = sum(f["size"] for f in manifest["files"])
    n_chunks = len(manifest["chunks"])
    assert size == v2["size_bytes"] and n_chunks > 60, (size, n_chunks)
    key = tmp_path / "controller.pem"
    key.write_text(ctl.get("/api/v1/signing-key").json()["public_key_pem"])
    http_port = free_port()
    fleet.start_agent("edge-base", "--signing-key-file", str(key), "--http-port", str(http_port))
    fleet.start_agent("edge-new", "--signing-key-file", str(key))
    fleet.start_agent("edge-rot", "--signing-key-file", str(key))
    fleet.wait_online(["edge-base", "edge-new", "edge-rot"], 30)
    deploy_and_wait(ctl, 1, "edge-base")
    deploy_and_wait(ctl, 1, "edge-rot")
    assert v1["artifact_id"] != v2["artifact_id"]

    # 1. the device running v1: the head's few chunks, from the broadcast that starts where it lacks them
    before = published(ctl)
    deploy_and_wait(ctl, 2, "edge-base")
    after = published(ctl)
    sent = after[0] - before[0] + after[1] - before[1]
    assert 0 < sent <= 0.05 * size, f"{sent} bytes sent for a head-only fine-tune of {size}"
    files = installed(tmp_path, "edge-base")
    for entry in manifest["files"]:
        assert hashlib.sha256(files[entry["path"]]).hexdigest() == entry["sha256"], entry["path"]
    assert files["model.onnx"] == (tmp_path / "v2" / "model.onnx").read_bytes()
    answer = httpx.post(f"http://127.0.0.1:{http_port}/v1/infer", json={"text": "good great"}, timeout=30).json()
    assert answer["model"]["version"] == 2 and answer["result"]["label"] in ("negative", "positive"), answer
    log = (tmp_path / "edge-base.log").read_text()
    assert "Traceback" not in log, log[-3000:]

    # 2. a device without v1: the whole artifact, by broadcast
    before = published(ctl)
    deploy_and_wait(ctl, 2, "edge-new")
    after = published(ctl)
    assert after[0] - before[0] >= size, "a device without the base receives the full artifact"
    assert installed(tmp_path, "edge-new")["model.onnx"] == files["model.onnx"]

    # 3. a device whose installed v1 rotted: the damaged chunk is not copied; it and the head are asked for
    fleet.agents["edge-rot"].kill()
    slots = tmp_path / "edge-rot" / "deploy" / "slots"
    rotten = slots / (slots / "active").read_text().strip() / "files" / "model.onnx"
    data = bytearray(rotten.read_bytes())
    data[CHUNK * 10 + 7] ^= 0xFF  # inside the body's weights: shared by v1 and v2
    rotten.write_bytes(bytes(data))
    fleet.start_agent("edge-rot", "--signing-key-file", str(key))
    fleet.wait_online(["edge-rot"], 30)
    before = published(ctl)
    deploy_and_wait(ctl, 2, "edge-rot")
    after = published(ctl)
    assert after[0] - before[0] == 0, "sparse: the few scattered chunks it lacks are not broadcast"
    assert 0 < after[1] - before[1] <= 0.05 * size, "asked alone: the head's chunks and the rotted one"
    assert installed(tmp_path, "edge-rot")["model.onnx"] == files["model.onnx"]

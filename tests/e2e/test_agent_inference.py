"""The skeleton agent serving a real ONNX model over JSON-lines input, reporting telemetry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.e2e.fleet import Fleet
from tests.helpers import wait_until


def tiny_model(path: Path) -> Path:
    """y = relu(x @ W + b) with x: float[batch, 4], a real onnxruntime-loadable graph."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [3], [0.5, -100.0, 1.0])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def totals(ctl, device_id: str) -> tuple[int, int, list[dict]]:  # type: ignore[no-untyped-def]
    rows = ctl.get(f"/api/v1/devices/{device_id}/telemetry").json()
    if not isinstance(rows, list):  # not registered yet
        return 0, 0, []
    count = sum(r["inference_count"] for r in rows)
    errors = sum(r["inference_errors"] for r in rows)
    return count, errors, rows


def test_inference_over_a_jsonl_file_is_counted_timed_and_reported(fleet: Fleet, tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "tiny.onnx")
    inputs = tmp_path / "in.jsonl"
    good = [{"x": [[1.0, 2.0, 3.0, 4.0]]}, {"inputs": {"x": [[0, 0, 0, 1], [1, 1, 1, 1]]}}] * 50
    bad = ["{broken json", json.dumps({"y": [[1, 2, 3, 4]]}), json.dumps({"x": [1, 2, 3, 4]})]
    inputs.write_text("\n".join([json.dumps(g) for g in good] + bad) + "\n")
    results = tmp_path / "out.jsonl"
    ctl = fleet.start_controller()
    fleet.start_agent(
        "infer-1",
        "--model",
        str(model),
        "--input",
        str(inputs),
        "--results",
        str(results),
        "--telemetry-interval",
        "0.5",
    )
    wait_until(lambda: totals(ctl, "infer-1")[:2] == (100, 3), 30, what="100 inferences and 3 errors reported")
    rows = [r for r in totals(ctl, "infer-1")[2] if r["inference_count"]]
    assert all(r["latency_p50_ms"] > 0 and r["latency_p99_ms"] >= r["latency_p50_ms"] for r in rows)
    out = [json.loads(line) for line in results.read_text().splitlines()]
    # Every record gets a result line, a failed one with its error (the line that is not JSON is no record).
    served = [o["result"] for o in out if "error" not in o["result"]]
    failed = [o["result"]["error"] for o in out if "error" in o["result"]]
    assert len(served) == 100 and len(failed) == 2
    assert served[0]["y"] == [[60.5, 0.0, 81.0]]  # relu([1,2,3,4] @ W + b)
    assert all(o["source"] == f"file:{inputs}" for o in out)


def test_inference_over_stdin(fleet: Fleet, tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "tiny.onnx")
    ctl = fleet.start_controller()
    from tests.helpers import Proc, slmfleet_cmd

    agent = Proc(
        slmfleet_cmd(
            "agent",
            "--broker",
            fleet.broker_url,
            "--device-id",
            "stdin-1",
            "--data-dir",
            str(tmp_path / "dev"),
            "--model",
            str(model),
            "--input",
            "-",
            "--telemetry-interval",
            "0.5",
        ),
        tmp_path / "stdin.log",
        stdin=True,
    )
    fleet.agents["stdin-1"] = agent
    agent.write_stdin("".join(json.dumps({"x": [[1, 1, 1, 1]]}) + "\n" for _ in range(25)))
    wait_until(lambda: totals(ctl, "stdin-1")[0] == 25, 30, what="25 inferences from stdin")
    agent.write_stdin("not json\n")
    wait_until(lambda: totals(ctl, "stdin-1")[1] == 1, 30, what="the bad line counted as an error")

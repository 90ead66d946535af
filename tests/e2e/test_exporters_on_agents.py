"""Models written by the ecosystem's exporters, imported as a user would (the folder, a name, the reference
outputs of their framework), deployed to a real agent process over a real broker, and asked through the
agent's HTTP endpoint: classification logits and embeddings within 1e-4, greedy generation ids exactly,
anomaly labels exactly. Also on a real agent: a request over the model's context answers 400 with the limit
(never 500), and a device running v1 fp32 switches to v1 int8."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.broker.embedded import free_port
from tests.e2e.fleet import ControllerProc, Fleet
from tests.helpers import wait_until
from tests.registry.test_exporters import FIXTURES, LAYOUTS, reference, tar_gz

pytestmark = pytest.mark.slow

DEVICE = "edge-byom"


def import_export(ctl: ControllerProc, name: str, layout: str, options: dict[str, Any]) -> dict[str, Any]:
    folder = FIXTURES / layout
    if layout.startswith("skl2onnx"):
        graph = next(folder.glob("*.onnx"))
        files = [("file", (graph.name, graph.read_bytes()))]
    else:
        files = [("file", (f"{layout}.tar.gz", tar_gz(folder)))]
    r = httpx.post(
        ctl.api + f"/api/v1/models/{name}/versions",
        files=files,
        data={"options": json.dumps(options)},
        headers=ctl.auth,
        timeout=300,
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def deploy_and_wait(ctl: ControllerProc, name: str, version: int, variant: str) -> None:
    body = {"model": name, "version": version, "variant": variant, "target": {"devices": [DEVICE]}}
    r = httpx.post(ctl.api + "/api/v1/deployments", json=body, headers=ctl.auth, timeout=10)
    assert r.status_code == 201, r.text
    dep = r.json()["id"]
    done = wait_until(
        lambda: (d := ctl.get(f"/api/v1/deployments/{dep}").json())["status"] in ("completed", "failed") and d,
        120,
        what=f"{name} v{version} {variant} deployed",
    )
    assert done["status"] == "completed", done


def start_agent(fleet: Fleet, ctl: ControllerProc, tmp_path: Path) -> str:
    key = tmp_path / "controller.pem"
    key.write_text(ctl.get("/api/v1/signing-key").json()["public_key_pem"])
    port = free_port()
    fleet.start_agent(DEVICE, "--signing-key-file", str(key), "--http-port", str(port))
    fleet.wait_online([DEVICE], 30)
    return f"http://127.0.0.1:{port}/v1/infer"


def close(expected: list[float], got: list[float], tol: float = 1e-4) -> bool:
    return len(expected) == len(got) and all(abs(a - b) <= tol for a, b in zip(expected, got, strict=True))


def test_every_export_serves_its_framework_outputs_on_a_real_agent(fleet: Fleet, tmp_path: Path) -> None:
    ctl = fleet.start_controller()
    url = start_agent(fleet, ctl, tmp_path)
    for layout in sorted(LAYOUTS):
        name = layout
        cases = reference(layout)
        import_export(ctl, name, layout, {"variants": ["fp32"], "reference": cases})
        deploy_and_wait(ctl, name, 1, "fp32")
        for case in cases:
            r = httpx.post(url, json=case["input"], timeout=60)
            assert r.status_code == 200, (layout, r.text)
            body = r.json()
            assert body["model"]["model"] == name
            got, want = body["result"], case["expected"]
            if "logits" in want:
                assert close(want["logits"], got["logits"]), (layout, want, got)
            if "embedding" in want:
                assert close(want["embedding"], got["embedding"]), (layout, want, got)
            if "token_ids" in want:
                assert got["token_ids"] == want["token_ids"], (layout, case["input"], got)
            if "label" in want:
                assert str(got["label"]) == str(want["label"]) and got["anomaly"] == want["anomaly"], (layout, got)


def test_over_the_context_is_a_400_that_says_the_limit_and_a_variant_switch_within_a_version(
    fleet: Fleet, tmp_path: Path
) -> None:
    ctl = fleet.start_controller()
    url = start_agent(fleet, ctl, tmp_path)
    # GPT-2 with 128 positions: the import read the limit from config.json
    version = import_export(ctl, "gpt2", "optimum-gpt2-with-past", {"variants": ["fp32"]})
    manifest = httpx.get(ctl.api + version["variants"][0]["manifest_url"], timeout=10).json()["manifest"]
    assert manifest["preprocess"]["max_length"] == 128 and manifest["generation"]["eos_token_id"] == [0]
    deploy_and_wait(ctl, "gpt2", 1, "fp32")
    r = httpx.post(url, json={"prompt": "the pump is running", "max_new_tokens": 200}, timeout=30)
    assert r.status_code == 400 and "context of 128 tokens" in r.json()["error"], r.text
    long_prompt = " ".join(["vibration"] * 200)
    r = httpx.post(url, json={"prompt": long_prompt}, timeout=30)
    assert r.status_code == 400 and "over the model's context of 128 tokens" in r.json()["error"], r.text
    r = httpx.post(url, json={"prompt": long_prompt, "max_new_tokens": 4, "truncate": True}, timeout=30)
    assert r.status_code == 200 and r.json()["result"]["truncated"] is True, r.text

    # the BERT classifier (128 positions) imports; a text over the limit is refused, or cut on request
    import_export(ctl, "clf", "optimum-bert-classifier", {"variants": ["fp32", "int8"]})
    deploy_and_wait(ctl, "clf", 1, "fp32")
    r = httpx.post(url, json={"text": long_prompt}, timeout=30)
    assert r.status_code == 400 and "limit of 128" in r.json()["error"], r.text
    r = httpx.post(url, json={"text": long_prompt, "truncate": True}, timeout=30)
    assert r.status_code == 200 and r.json()["result"]["truncated"] is True
    assert r.json()["model"]["variant"] == "fp32"
    # v1 fp32 -> v1 int8 on the same device (memory pressure is a reason to)
    deploy_and_wait(ctl, "clf", 1, "int8")
    r = httpx.post(url, json={"text": "the pump is running"}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == {"model": "clf", "version": 1, "variant": "int8"}, r.text


def test_a_user_adds_a_t5_export_and_its_reference_with_the_cli_and_an_agent_serves_its_int8(
    fleet: Fleet, tmp_path: Path
) -> None:
    """As the README says: ``slmfleet model add ./optimum-t5 --name summarizer --reference FILE``, nothing else.
    fp32 passes the reference; int8 and int4 quantize the merged decoder's layers too (they sit inside its
    If branches); the int8 variant on a real agent answers the framework's token ids. A reference the model
    does not reproduce fails the import with one line that says where."""
    import subprocess

    from tests.helpers import slmfleet_cmd

    ctl = fleet.start_controller()
    url = start_agent(fleet, ctl, tmp_path)
    cli = ["--api", ctl.api, "--data-dir", str(ctl.data_dir)]
    ref_file = FIXTURES / "optimum-t5.reference.jsonl"
    done = subprocess.run(
        slmfleet_cmd("model", "add", str(FIXTURES / "optimum-t5"), "--name", "summarizer", "--reference", str(ref_file))
        + ["--json", *cli],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    version = json.loads(done.stdout)
    assert version["task"] == "text2text"
    variants = {v["variant"]: v for v in version["variants"]}
    assert set(variants) == {"fp32", "int8", "int4"}, version["refused"]
    assert variants["fp32"]["metrics"]["reference"] == "pass"
    assert variants["fp32"]["metrics"]["reference_cases"] == len(reference("optimum-t5"))
    # before: int8 left every layer of decoder_model_merged.onnx in fp32 (39% of the bundle's weights)
    assert variants["int8"]["quantization"]["weight_fraction"] > 0.95
    assert variants["int4"]["quantization"]["weight_fraction"] > 0.8
    assert variants["int8"]["metrics"]["reference"] == "pass"

    deploy_and_wait(ctl, "summarizer", 1, "int8")
    for case in reference("optimum-t5"):
        r = httpx.post(url, json=case["input"], timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["variant"] == "int8"
        assert r.json()["result"]["token_ids"] == case["expected"]["token_ids"], (case, r.json())

    cases = reference("optimum-t5")
    cases[1]["expected"]["token_ids"][0] += 1
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps(c) + "\n" for c in cases))
    done = subprocess.run(
        slmfleet_cmd("model", "add", str(FIXTURES / "optimum-t5"), "-n", "summarizer", "--reference", str(wrong)) + cli,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "fp32 does not reproduce the reference outputs" in line and "case 2: token_ids" in line, line

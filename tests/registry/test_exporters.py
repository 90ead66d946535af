"""Models as the ecosystem's exporters write them (optimum, sentence-transformers, skl2onnx,
onnxruntime-genai), imported with what a user would naturally pass: the folder, a name and (optionally)
the reference outputs their framework gave. No task, no options found only in the source.

The fixtures are made by ``tests/fixtures/exporters/make_fixtures.py`` with the real tools; their
``*.reference.jsonl`` hold outputs computed by plain onnxruntime / tokenizers / the frameworks."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.manifest import SignedManifest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "exporters"

#: layout -> (task the import must detect, files the device must get, the manifest's decoder settings)
LAYOUTS: dict[str, tuple[str, set[str]]] = {
    "optimum-bert-classifier": ("text-classification", {"model.onnx", "tokenizer.json"}),
    "optimum-gpt2-with-past": ("text-generation", {"model.onnx", "tokenizer.json"}),
    "optimum-gpt2-no-past": ("text-generation", {"model.onnx", "tokenizer.json"}),
    "optimum-gpt2-legacy": ("text-generation", {"decoder_model_merged.onnx", "tokenizer.json"}),
    "optimum-t5": ("text2text", {"encoder_model.onnx", "decoder_model_merged.onnx", "tokenizer.json"}),
    "sentence-transformers-cls": ("embeddings", {"onnx/model.onnx", "tokenizer.json"}),
    "skl2onnx-isolation-forest": ("anomaly", {"model.onnx"}),
    "skl2onnx-random-forest": ("anomaly", {"model.onnx"}),
    "genai-llama": ("text-generation", {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"}),
}


def reference(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.reference.jsonl").read_text().splitlines() if line]


def tar_gz(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(root, arcname=root.name)
    return buf.getvalue()


def upload_export(ctl: Any, name: str, layout: str, options: dict[str, Any] | None = None) -> Any:
    """Upload a fixture as a user would: a folder as an archive, a lone skl2onnx graph as the file itself."""
    folder = FIXTURES / layout
    graphs = list(folder.glob("*.onnx"))
    if layout.startswith("skl2onnx"):
        files = [("file", (graphs[0].name, graphs[0].read_bytes(), "application/octet-stream"))]
    else:
        files = [("file", (f"{layout}.tar.gz", tar_gz(folder), "application/octet-stream"))]
    data = {"options": json.dumps(options)} if options is not None else {}
    return ctl.client.post(f"/api/v1/models/{name}/versions", files=files, data=data, headers=ctl.auth)


@pytest.fixture
def ctl(make_controller):  # type: ignore[no-untyped-def]
    return make_controller(None)


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_export_imports_as_written_and_fp32_reproduces_its_framework(ctl, layout: str) -> None:  # type: ignore[no-untyped-def]
    task, files = LAYOUTS[layout]
    options = {"reference": reference(layout), "variants": ["fp32", "int8"]}
    r = upload_export(ctl, layout.replace("_", "-"), layout, options)
    assert r.status_code == 201, r.text
    version = r.json()
    assert version["task"] == task
    variants = {v["variant"]: v for v in version["variants"]}
    fp32 = variants["fp32"]["metrics"]
    # checked against the framework's outputs, not against itself
    assert fp32["reference"] == "pass", fp32
    assert fp32.get("agreement") is None and fp32["reference_cases"] == len(reference(layout))
    signed = SignedManifest.model_validate(ctl.client.get(variants["fp32"]["manifest_url"]).json())
    assert {f.path for f in signed.manifest.files} == files


def test_a_reference_file_part_checks_fp32_and_a_wrong_one_fails_the_import_with_the_difference(ctl) -> None:  # type: ignore[no-untyped-def]
    """The REST form of ``--reference FILE``: a multipart ``reference`` part of JSON lines, as the fixtures'
    ``*.reference.jsonl`` are; it is not a bundle file (not shipped, not stored)."""
    layout = "sentence-transformers-cls"
    folder = FIXTURES / layout
    lines = (FIXTURES / f"{layout}.reference.jsonl").read_text()

    def post(name: str, reference: str, options: dict[str, Any] | None = None) -> Any:
        files = [
            ("file", (f"{layout}.tar.gz", tar_gz(folder), "application/octet-stream")),
            ("reference", ("expected.jsonl", reference.encode(), "application/jsonl")),
        ]
        data = {"options": json.dumps(options or {"variants": ["fp32"]})}
        return ctl.client.post(f"/api/v1/models/{name}/versions", files=files, data=data, headers=ctl.auth)

    r = post("st-ref", lines)
    assert r.status_code == 201, r.text
    [fp32] = r.json()["variants"]
    assert fp32["metrics"]["reference"] == "pass" and fp32["metrics"]["reference_cases"] == len(reference(layout))
    signed = SignedManifest.model_validate(ctl.client.get(fp32["manifest_url"]).json())
    assert "expected.jsonl" not in {f.path for f in signed.manifest.files}

    # an embedding the model does not produce: the import fails and says where and by how much
    cases = reference(layout)
    cases[2]["expected"]["embedding"][5] += 0.01
    wrong = "\n".join(json.dumps(c) for c in cases)
    r = post("st-wrong", wrong)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "fp32 does not reproduce the reference outputs" in detail and "case 3" in detail, detail
    assert "embedding differs by 0.01" in detail, detail
    assert ctl.client.get("/api/v1/models/st-wrong").status_code == 404

    # a malformed file is refused before anything is built, naming the line; so is a reference given twice
    r = post("st-bad", lines.splitlines()[0] + "\n{not json\n")
    assert r.status_code == 422 and "reference line 2 is not JSON" in r.json()["detail"], r.text
    r = post("st-bad", '{"input": {"text": "x"}}\n')
    assert r.status_code == 422 and "reference line 1: expected: Field required" in r.json()["detail"], r.text
    r = post("st-bad", lines, {"reference": cases[:1]})
    assert r.status_code == 422 and "the reference is given twice" in r.json()["detail"], r.text


@pytest.mark.parametrize(
    "layout", ["optimum-gpt2-with-past", "optimum-gpt2-legacy", "optimum-t5", "optimum-bert-classifier"]
)
def test_int8_and_int4_quantize_the_layers_wherever_the_export_keeps_them(layout: str, tmp_path: Path) -> None:
    """GPT-2's layers are Gemm; a merged decoder keeps all of them inside the branches of an If, with the
    weights in the outer graph. Before, int8 of a merged decoder quantized none of them (a T5 export: 39% of
    its weights, in the encoder only) and int4 of the merged GPT-2 12%. Every graph is checked on its own."""
    import shutil

    from controller.registry.bundles import ImportOptions, ReferenceCase
    from controller.registry.convert import quantize
    from controller.registry.convert.weights import weight_fraction
    from controller.registry.layouts import inspect_bundle
    from controller.registry.reference import run_reference

    shutil.copytree(FIXTURES / layout, tmp_path / layout)
    fp32 = inspect_bundle(tmp_path / layout, ImportOptions()).bundle
    cases = [ReferenceCase.model_validate(c) for c in reference(layout)]
    # int4 leaves the embedding tables in fp32: GPT-2's are 30% of its weights at this size
    wanted = {"int8-dynamic": 0.95} | ({"int4-weight-only": 0.65} if fp32.spec.generation else {})
    for method, share in wanted.items():
        variant = quantize(fp32, method, tmp_path / method)
        graphs = [p for p in variant.files() if p.suffix == ".onnx"]
        for graph in graphs:
            assert (weight_fraction([variant.root / graph]) or 0) > share, (method, graph)
        assert variant.quantization.weight_fraction is not None and variant.quantization.weight_fraction > share
        checked = run_reference(variant, cases, 1e-4, decisions_only=True)
        assert checked.passed, (method, checked.detail)

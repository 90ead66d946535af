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

from wire.manifest import SignedManifest

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
    if "int8" in variants:  # its decisions: labels, the class the logits pick, token ids, embeddings' direction
        int8 = variants["int8"]["metrics"]
        if layout.startswith("genai"):
            # onnxruntime-genai's builder quantizes a random-weight Llama whose logits are near flat: greedy ids
            # may flip on some prompts (recorded), while the teacher-forced agreement stays above the int8 floor
            assert int8["reference"] in ("pass", "fail") and int8["agreement"] >= 0.5, int8
        else:
            assert int8["reference"] == "pass", int8


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

    r = post("st-ref", lines, {"variants": ["fp32", "int8"]})
    assert r.status_code == 201, r.text
    fp32, int8 = r.json()["variants"]
    assert fp32["metrics"]["reference"] == "pass" and fp32["metrics"]["reference_cases"] == len(reference(layout))
    # int8 cannot match floats to 1e-4: its embeddings are checked for their direction (the cosine floor)
    assert int8["metrics"]["reference"] == "pass", int8["metrics"]
    assert int8["metrics"]["reference_detail"].startswith(f"{len(reference(layout))}/{len(reference(layout))}")
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


@pytest.mark.parametrize(
    "layout", ["optimum-gpt2-with-past", "optimum-gpt2-no-past", "optimum-gpt2-legacy", "optimum-t5", "genai-llama"]
)
def test_teacher_forcing_runs_through_every_generation_loop(layout: str, tmp_path: Path) -> None:
    """The registry's token agreement feeds a variant the reference's tokens through the variant's own loop
    (KV cache, full re-run, two graphs or merged, seq2seq, onnxruntime-genai's graph): fed its own greedy
    tokens a model picks them again, and fed other tokens it picks what that context gives."""
    import shutil

    import numpy as np

    from agent.inference.pipelines import load_pipeline
    from agent.inference.pipelines.generation import TokenStreamPipeline
    from controller.registry.bundles import ImportOptions
    from controller.registry.layouts import inspect_bundle

    shutil.copytree(FIXTURES / layout, tmp_path / layout)
    bundle = inspect_bundle(tmp_path / layout, ImportOptions()).bundle
    pipe = load_pipeline(bundle.spec, bundle.root)
    assert isinstance(pipe, TokenStreamPipeline)
    try:
        for case in reference(layout):
            ids = pipe.generate(case["input"]).token_ids
            assert ids == case["expected"]["token_ids"]
            assert pipe.forced(case["input"], ids) == ids
        if layout.startswith("optimum-gpt2"):
            record = reference(layout)[0]["input"]
            prompt = pipe.encode(record["prompt"])
            target = [7, 30, 2, 99, 5, 12]
            logits = pipe.decoder.logits(prompt + target[:-1])  # type: ignore[attr-defined]
            expected = [int(i) for i in np.argmax(logits[len(prompt) - 1 :], axis=-1)]
            assert pipe.forced(record, target) == expected
    finally:
        pipe.close()


def _archive_with_outliers(layout: str, tmp_path: Path) -> bytes:
    """The fixture with outlier weights on channels its fp32 never uses (``benchmarks.floors.with_outliers``):
    fp32 and int8 work, int4 rounds every other weight of those layers to 0."""
    import shutil

    from benchmarks.floors import with_outliers
    from controller.registry.bundles import ImportOptions
    from controller.registry.layouts import inspect_bundle

    shutil.copytree(FIXTURES / layout, tmp_path / "export")
    bundle = inspect_bundle(tmp_path / "export", ImportOptions()).bundle
    shifted = with_outliers(bundle, tmp_path / "shifted" / layout)
    for rel in (p.relative_to(FIXTURES / layout) for p in (FIXTURES / layout).rglob("*") if p.is_file()):
        if not (shifted.root / rel).exists():  # the files the device does not get stay in the folder
            (shifted.root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(FIXTURES / layout / rel, shifted.root / rel)
    return tar_gz(shifted.root)


def test_an_int4_that_destroys_the_output_is_refused_with_its_measure_and_the_floor(ctl, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A GPT-2 export whose int4 produces garbage, imported with no options: int4 is refused with the measured
    token agreement and the floor in the reason; int8 of the same export is kept."""
    archive = _archive_with_outliers("optimum-gpt2-with-past", tmp_path)
    files = [("file", ("gpt2.tar.gz", archive, "application/octet-stream"))]
    r = ctl.client.post("/api/v1/models/outliers/versions", files=files, headers=ctl.auth)
    assert r.status_code == 201, r.text
    version = r.json()
    assert {v["variant"] for v in version["variants"]} == {"fp32", "int8"}
    int8 = next(v for v in version["variants"] if v["variant"] == "int8")["metrics"]
    assert int8["agreement_kind"] == "token" and int8["agreement"] > 0.9
    [refused] = version["refused"]
    floor = ctl.runtime.models.importer.floor("token", "int4")
    assert refused["variant"] == "int4" and refused["agreement"] < floor
    assert f"is {refused['agreement']:.4f}, below the floor of {floor:.4f}" in refused["reason"], refused


def test_a_classifier_variant_whose_logits_no_longer_follow_the_text_is_refused_though_its_labels_match(  # type: ignore[no-untyped-def]
    ctl, tmp_path: Path
) -> None:
    """The fixture classifier answers one class for the evaluation texts; its int4 with outliers answers it too
    (top-1 agreement 1.0) but its logits no longer move with the text: refused on the scores' correlation."""
    archive = _archive_with_outliers("optimum-bert-classifier", tmp_path)
    files = [("file", ("bert.tar.gz", archive, "application/octet-stream"))]
    options = {"variants": ["fp32", "int8", "int4"]}
    r = ctl.client.post(
        "/api/v1/models/collapsed/versions", files=files, data={"options": json.dumps(options)}, headers=ctl.auth
    )
    assert r.status_code == 201, r.text
    version = r.json()
    assert {v["variant"] for v in version["variants"]} == {"fp32", "int8"}
    [refused] = version["refused"]
    floor = ctl.runtime.models.importer.floor("score-correlation", "int4")
    assert refused["variant"] == "int4" and refused["agreement"] >= 0.9, refused
    assert "correlation of" in refused["reason"] and f"below the floor of {floor:.4f}" in refused["reason"], refused

"""Registering models through the REST API: variants, signatures, content addressing, bad input."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, func, select

from controller.db.models import Artifact, ModelVersion
from tests.helpers import wait_until
from tests.registry.tiny_models import anomaly_model, text_classifier
from wire import signing
from wire.manifest import SignedManifest


@pytest.fixture
def ctl(make_controller):  # type: ignore[no-untyped-def]
    return make_controller(None)


def tar_gz(root: Path, arcname: str = "bundle") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(root, arcname=arcname)
    return buf.getvalue()


def upload(ctl, name: str, files: list[tuple[str, bytes]], options: dict[str, Any] | None = None, **params: Any):  # type: ignore[no-untyped-def]
    multipart = [("file", (fname, data, "application/octet-stream")) for fname, data in files]
    data = {"options": json.dumps(options)} if options is not None else {}
    return ctl.client.post(
        f"/api/v1/models/{name}/versions", files=multipart, data=data, headers=ctl.auth, params=params
    )


def counts(ctl) -> tuple[int, int, int, int]:  # type: ignore[no-untyped-def]
    """(versions, artifacts, blobs, staging entries)"""
    registry = ctl.runtime.models
    with Session(ctl.runtime.engine) as s:
        versions = s.exec(select(func.count()).select_from(ModelVersion)).one()
        artifacts = s.exec(select(func.count()).select_from(Artifact)).one()
    blobs = len(list(registry.store.blobs.glob("*/*/*")))
    return int(versions), int(artifacts), blobs, len(list(registry.staging.iterdir()))


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text_classifier(tmp_path_factory.mktemp("clf") / "bundle")


def test_a_bundle_becomes_a_signed_version_with_fp32_and_int8(ctl, classifier_dir: Path) -> None:  # type: ignore[no-untyped-def]
    r = ctl.client.post("/api/v1/models", json={"name": "sentiment", "task": "text-classification"}, headers=ctl.auth)
    assert r.status_code == 201, r.text
    r = upload(ctl, "sentiment", [("bundle.tar.gz", tar_gz(classifier_dir))])
    assert r.status_code == 201, r.text
    version = r.json()
    assert version["number"] == 1 and version["task"] == "text-classification"
    variants = {v["variant"]: v for v in version["variants"]}
    assert set(variants) == {"fp32", "int8"}
    assert variants["int8"]["metrics"]["agreement_kind"] == "top1"
    assert variants["int8"]["metrics"]["agreement"] >= 0.9
    assert variants["fp32"]["metrics"]["latency_ms_p50"] > 0
    assert variants["int8"]["quantization"]["method"] == "int8-dynamic"
    assert variants["int8"]["quantization"]["per_channel"] is True

    key = ctl.client.get("/api/v1/signing-key").json()
    public = signing.load_public_key(key["public_key_pem"])
    for v in variants.values():
        signed = SignedManifest.model_validate(ctl.client.get(v["manifest_url"]).json())
        manifest = signing.verify(signed, public)
        assert manifest.artifact_id == v["artifact_id"]
        assert manifest.postprocess.labels == ["negative", "positive"]
        assert manifest.preprocess.tokenizer == "tokenizer.json"
        assert {f.path for f in manifest.files} >= {"model.onnx", "tokenizer.json"}
        for f in manifest.files:
            blob = ctl.runtime.models.store.path(f.sha256)
            assert blob.stat().st_size == f.size
        assert sum(c.size for c in manifest.chunks) == manifest.total_size
        assert manifest.expires_at and manifest.expires_at > manifest.created_at + 300 * 86400
    assert ctl.client.get("/api/v1/models/sentiment/versions/1").json() == version
    listed = ctl.client.get("/api/v1/models").json()
    assert listed[0]["name"] == "sentiment" and listed[0]["latest_version"] == 1


def test_versions_only_grow_and_identical_files_are_stored_once(ctl, classifier_dir: Path) -> None:  # type: ignore[no-untyped-def]
    first = upload(ctl, "clf", [("b.tar.gz", tar_gz(classifier_dir))], {"task": "text-classification"})
    assert first.status_code == 201, first.text
    blobs_after_first = counts(ctl)[2]
    second = upload(ctl, "clf", [("b.tar.gz", tar_gz(classifier_dir))])
    assert second.status_code == 201 and second.json()["number"] == 2
    assert counts(ctl)[2] == blobs_after_first  # same bytes, same blobs
    ids = {v["artifact_id"] for v in first.json()["variants"]} | {v["artifact_id"] for v in second.json()["variants"]}
    assert len(ids) == 4  # manifests differ (version number), content does not
    assert ctl.client.get("/api/v1/models/clf").json()["versions"] == 2


def test_separate_files_in_one_multipart_upload(ctl, classifier_dir: Path) -> None:  # type: ignore[no-untyped-def]
    files = [(p.name, p.read_bytes()) for p in sorted(classifier_dir.iterdir())]
    r = upload(ctl, "multi", files, {"task": "text-classification", "variants": ["fp32"]})
    assert r.status_code == 201, r.text
    assert [v["variant"] for v in r.json()["variants"]] == ["fp32"]


def test_a_sensor_anomaly_model_is_first_class(ctl, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, threshold = anomaly_model(tmp_path / "iforest.onnx")
    options = {"task": "anomaly", "anomaly": {"threshold": threshold, "higher_is_anomalous": False, "output": "scores"}}
    r = upload(ctl, "pump-anomaly", [("iforest.onnx", path.read_bytes())], options)
    assert r.status_code == 201, r.text
    fp32 = r.json()["variants"][0]
    manifest = ctl.client.get(fp32["manifest_url"]).json()["manifest"]
    assert manifest["task"] == "anomaly" and manifest["anomaly"]["n_features"] == 8
    assert manifest["anomaly"]["threshold"] == threshold and manifest["files"][0]["path"] == "model.onnx"


def test_slow_imports_answer_202_with_a_job_to_poll(ctl, classifier_dir: Path) -> None:  # type: ignore[no-untyped-def]
    r = upload(ctl, "later", [("b.tar.gz", tar_gz(classifier_dir))], {"task": "text-classification"}, wait=0)
    assert r.status_code == 202 and r.headers["location"] == r.json()["url"]
    job = wait_until(lambda: (j := ctl.client.get(r.json()["url"]).json())["status"] == "succeeded" and j, 60)
    assert job["version"] == 1 and job["progress"] == 1.0
    assert ctl.client.get("/api/v1/models/later/versions/1").status_code == 200


def _zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open("model.onnx", "w") as f:
        block = b"\0" * (1024 * 1024)
        for _ in range(300):  # 300 MiB of zeros in a few hundred kB
            f.write(block)
    return buf.getvalue()


def _traversal_tar(classifier_dir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(classifier_dir / "model.onnx", arcname="bundle/model.onnx")
        tf.add(classifier_dir / "tokenizer.json", arcname="../../evil.json")
    return buf.getvalue()


def _symlink_tar(classifier_dir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(classifier_dir / "model.onnx", arcname="model.onnx")
        link = tarfile.TarInfo("tokenizer.json")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("case", "status", "needle"),
    [
        ("not_onnx", 422, "not a valid ONNX model"),
        ("truncated", 422, "not a valid ONNX model"),
        ("wrong_task", 422, "does not take token ids"),
        ("missing_tokenizer", 422, "tokenizer.json"),
        ("zip_bomb", 413, "bomb"),
        ("traversal", 422, "path traversal"),
        ("symlink", 422, "links are refused"),
        ("empty", 422, "no file"),
        ("no_task", 422, "do not say which task"),
        ("bad_options", 422, "options"),
        ("hf_without_weights", 422, "no model found"),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing_behind(  # type: ignore[no-untyped-def]
    ctl, classifier_dir: Path, tmp_path: Path, case: str, status: int, needle: str
) -> None:
    before = counts(ctl)
    model_bytes = (classifier_dir / "model.onnx").read_bytes()
    tok = (classifier_dir / "tokenizer.json").read_bytes()
    clf = {"task": "text-classification"}
    if case == "not_onnx":
        r = upload(ctl, "bad", [("model.onnx", b"this is not a model"), ("tokenizer.json", tok)], clf)
    elif case == "truncated":
        r = upload(ctl, "bad", [("model.onnx", model_bytes[: len(model_bytes) // 2]), ("tokenizer.json", tok)], clf)
    elif case == "wrong_task":
        path, _ = anomaly_model(tmp_path / "a.onnx")
        r = upload(ctl, "bad", [("model.onnx", path.read_bytes()), ("tokenizer.json", tok)], clf)
    elif case == "missing_tokenizer":
        r = upload(ctl, "bad", [("model.onnx", model_bytes)], clf)
    elif case == "zip_bomb":
        r = upload(ctl, "bad", [("bundle.zip", _zip_bomb())], clf)
    elif case == "traversal":
        r = upload(ctl, "bad", [("bundle.tar.gz", _traversal_tar(classifier_dir))], clf)
    elif case == "symlink":
        r = upload(ctl, "bad", [("bundle.tar", _symlink_tar(classifier_dir))], clf)
    elif case == "empty":
        r = ctl.client.post(
            "/api/v1/models/bad/versions",
            data={"options": json.dumps(clf)},
            headers=ctl.auth,
            files={"note": (None, "x")},
        )
    elif case == "no_task":
        # a graph whose files say nothing of its task (two float inputs, no tokenizer, no config.json)
        from onnx import TensorProto, helper

        x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 4]) for n in ("x", "y"))
        z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4])
        graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "g", [x, y], [z])
        blank = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        blank.ir_version = 9
        r = upload(ctl, "bad", [("model.onnx", blank.SerializeToString())])
    elif case == "bad_options":
        r = upload(ctl, "bad", [("model.onnx", model_bytes)], {"task": "text-classification", "colour": "red"})
    else:
        r = upload(ctl, "bad", [("config.json", b"{}"), ("README.md", b"hi")], clf)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    assert counts(ctl) == before
    assert ctl.client.get("/api/v1/models/bad").status_code == 404
    assert not (tmp_path.parent / "evil.json").exists()


def test_uploads_over_the_cap_are_cut_off_with_413(make_controller, classifier_dir: Path) -> None:  # type: ignore[no-untyped-def]
    ctl = make_controller(None, upload_max_bytes=4096)
    before = counts(ctl)
    r = upload(ctl, "big", [("model.onnx", b"x" * 100_000)], {"task": "anomaly"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    raw = ctl.client.post(
        "/api/v1/models/big/versions", content=b"y" * 100_000, headers=ctl.auth, params={"filename": "model.onnx"}
    )
    assert raw.status_code == 413
    assert counts(ctl) == before


def test_uploads_need_an_operator_token(ctl, classifier_dir: Path) -> None:  # type: ignore[no-untyped-def]
    r = ctl.client.post("/api/v1/models/x/versions", files=[("file", ("model.onnx", b"x"))])
    assert r.status_code == 401
    assert ctl.client.post("/api/v1/models", json={"name": "x", "task": "embeddings"}).status_code == 401


def test_model_creation_is_validated(ctl) -> None:  # type: ignore[no-untyped-def]
    bad = [{"name": "a/b", "task": "embeddings"}, {"name": "ok", "task": "dancing"}, {"name": "", "task": "anomaly"}]
    for body in bad:
        assert ctl.client.post("/api/v1/models", json=body, headers=ctl.auth).status_code == 422
    assert (
        ctl.client.post("/api/v1/models", json={"name": "dup", "task": "anomaly"}, headers=ctl.auth).status_code == 201
    )
    assert (
        ctl.client.post("/api/v1/models", json={"name": "dup", "task": "anomaly"}, headers=ctl.auth).status_code == 409
    )

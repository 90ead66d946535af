"""A model whose weights are an external-data file (the registry's int8 layout, issue 19) through a real deployment.

The file is signed and hashed like every file of the bundle, onnxruntime maps it from the slot instead of
copying it, and a weights file that is not the signed one is never loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.inference import mapped
from agent.inference.pipelines import load_pipeline
from tests.agent.deploy.harness import Artifact, artifact, deliver, deploy
from tests.agent.deploy.test_selftest import on_v1  # a disk device serving v1 with real models
from wire.messages import DeployState

S = DeployState
TEXTS = [{"text": "good great happy"}, {"text": "awful broken sad"}, {"text": "the pump was checked"}]


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory, bundles: dict) -> dict[str, bytes]:
    """v2's files with the graph's weights moved to ``model.onnx.data`` (the same graph, the same weights)."""
    root = tmp_path_factory.mktemp("external")
    model = onnx.load_from_string(bundles["v2"]["model.onnx"])
    onnx.save_model(model, str(root / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return {
        "model.onnx": (root / "model.onnx").read_bytes(),
        "model.onnx.data": (root / "model.onnx.data").read_bytes(),
        "tokenizer.json": bundles["v2"]["tokenizer.json"],
    }


def test_external_weights_deploy_are_mapped_from_the_slot_and_serve_the_same_outputs(
    key: Ed25519PrivateKey, data_dir: Path, tmp_path: Path, bundles: dict, v1: Artifact, external: dict
) -> None:
    art = artifact(external, key, version=2)
    assert [f.path for f in art.manifest.files] == ["model.onnx", "model.onnx.data", "tokenizer.json"]
    d = on_v1(key, data_dir, v1)
    d.command(deploy(art, "dep-2"))
    deliver(d, art)
    assert d.state == S.ACTIVE and d.active_artifact() == art.id, d.events("dep-2")[-1].reason
    loaded = d.host.current()
    assert loaded is not None and loaded.bundle_dir == data_dir / "slots" / "b" / "files"
    # onnxruntime reads the verified file in place: it is mapped, not copied into the heap
    assert mapped.mappings_of([loaded.bundle_dir / "model.onnx.data"])
    got = loaded.pipeline.run(TEXTS)

    embedded = tmp_path / "embedded"
    embedded.mkdir()
    for name, data in bundles["v2"].items():
        (embedded / name).write_bytes(data)
    want = load_pipeline(art.manifest.run_spec(), embedded, threads=1).run(TEXTS)
    for g, w in zip(got, want, strict=True):
        assert g["label"] == w["label"]
        np.testing.assert_array_equal(g["logits"], w["logits"])


def test_a_weights_file_that_is_not_the_signed_one_is_never_written_or_loaded(
    key: Ed25519PrivateKey, data_dir: Path, v1: Artifact, external: dict
) -> None:
    signed = artifact(external, key, version=2).signed
    data = bytearray(external["model.onnx.data"])
    data[len(data) // 2] ^= 0x01  # one weight, one bit
    tampered = Artifact(signed, dict(external, **{"model.onnx.data": bytes(data)}))
    d = on_v1(key, data_dir, v1)
    d.command(deploy(tampered, "dep-2"))
    with pytest.raises(AssertionError, match="still downloading"):
        deliver(d, tampered, max_rounds=3)
    assert d.state == S.DOWNLOADING and d.manager.counters["chunks_bad"] >= 1
    assert d.active_artifact() == v1.id and d.host.current() is not None
    assert d.host.current().artifact_id == v1.id  # type: ignore[union-attr]
    assert not mapped.mappings_of([data_dir / "slots" / "b" / "files" / "model.onnx.data"])


def test_a_graph_whose_weights_are_not_among_the_signed_files_is_not_loaded(
    key: Ed25519PrivateKey, data_dir: Path, v1: Artifact, external: dict
) -> None:
    files = {k: v for k, v in external.items() if k != "model.onnx.data"}
    art = artifact(files, key, version=2)
    d = on_v1(key, data_dir, v1)
    d.command(deploy(art, "dep-2"))
    deliver(d, art)
    assert d.record_states()[-3:] == [S.DOWNLOADING, S.VERIFYING, S.FAILED]
    assert "self-test failed (load)" in (d.events("dep-2")[-1].reason or "")
    assert d.active_artifact() == v1.id and d.host.current().artifact_id == v1.id  # type: ignore[union-attr]

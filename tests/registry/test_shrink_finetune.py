"""Fine-tuning on a separable labeled set (topic words): a classifier checkpoint that beats chance on the
held-out split, with and without LoRA, exports with its labels; a classifier teacher distils on soft labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.registry.shrink import distill, finetune
from tests.registry.shrink_models import context, sentences, tiny_bert
from wire.manifest import Task

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("encoder") / "ckpt", layers=2)


def test_finetuned_classifier_beats_chance_and_exports_with_labels(encoder: Path, tmp_path: Path) -> None:
    from controller.registry.convert import export_hf

    examples = sentences(150)
    ctx, _ = context(tmp_path / "work")
    report = finetune(encoder, tmp_path / "out", ctx, examples=examples, epochs=10, lr=1e-3)
    assert report.held_out == 30 and report.examples == 120
    assert report.quality["accuracy"] >= 0.8 > report.quality["chance"] + 0.3, report.quality
    assert 0.0 <= report.quality["baseline_accuracy"] <= 1.0
    bundle = export_hf(tmp_path / "out", Task.TEXT_CLASSIFICATION, tmp_path / "onnx")
    assert bundle.spec.postprocess.labels == ["food", "machines", "weather"]

    # the classifier as a teacher: its student learns its soft labels
    ctx, _ = context(tmp_path / "work-distill")
    texts = [t for t, _ in sentences(150, seed=1)]
    student = distill(tmp_path / "out", tmp_path / "student", ctx, texts=texts, student="layers=1", epochs=4, lr=1e-3)
    assert student.quality["agreement"] >= 0.8, student.quality
    assert export_hf(tmp_path / "student", Task.TEXT_CLASSIFICATION, tmp_path / "onnx-student").spec.postprocess.labels


def test_lora_adapters_are_trained_and_merged(encoder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ctx, _ = context(tmp_path / "work")
    report = finetune(encoder, tmp_path / "out", ctx, examples=sentences(150), lora_rank=4, epochs=12, lr=5e-3)
    assert report.quality["accuracy"] >= 0.7, report.quality
    assert any("LoRA rank 4" in n for n in report.notes)
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert not any("lora_" in k or "modules_to_save" in k or "base_model" in k for k in weights)
    base = load_file(encoder / "model.safetensors")
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(weights["bert." + key], base[key])  # the adapter moved the merged weight

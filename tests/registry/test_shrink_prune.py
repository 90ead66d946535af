"""Structured pruning on a tiny BERT built here: heads and FFN neurons removed (smaller matrices, a smaller
ONNX file that onnxruntime runs), the checkpoint reloads, recovery distillation is measured before and after."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from controller.registry.shrink import prune
from tests.registry.shrink_models import context, sentences, tiny_bert
from wire.manifest import Task

torch = pytest.importorskip("torch")


def test_pruning_half_the_heads_and_neurons_shrinks_the_matrices_and_the_onnx(tmp_path: Path) -> None:
    from agent.inference.pipelines import load_pipeline
    from controller.registry.convert import export_hf
    from controller.registry.shrink.models import load_model

    model = tiny_bert(tmp_path / "model")
    texts = [t for t, _ in sentences(160)]
    ctx, _ = context(tmp_path / "work")
    report = prune(model, tmp_path / "out", ctx, heads=0.5, ffn=0.5, recover_texts=texts, recover_epochs=3)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_attention_heads"] == 2 and config["attention_head_size"] == 16
    assert config["intermediate_size"] == 128
    assert report.params_after < report.params_before
    pruned = load_model(tmp_path / "out", Task.EMBEDDINGS)
    attention = pruned.encoder.layer[0].attention
    assert attention.self.query.weight.shape == (32, 64)
    assert attention.output.dense.weight.shape == (64, 32)
    assert pruned.encoder.layer[0].output.dense.weight.shape == (64, 128)
    q = report.quality
    assert {"cosine_mean", "cosine_p5", "cosine_mean_before_recovery", "cosine_p5_before_recovery"} <= set(q)
    assert q["cosine_mean"] > q["cosine_mean_before_recovery"], q

    bundle = export_hf(tmp_path / "out", Task.EMBEDDINGS, tmp_path / "onnx")
    full = export_hf(model, Task.EMBEDDINGS, tmp_path / "onnx-full")
    assert bundle.size_bytes < full.size_bytes
    # the agent's pipeline runs the pruned graph
    pipeline = load_pipeline(bundle.spec, bundle.root)
    out = pipeline.run([{"text": texts[0]}, {"text": texts[1]}])
    assert np.isclose(np.linalg.norm(out[0]["embedding"]), 1.0, atol=1e-4)

    # a derive chain goes on from the pruned checkpoint: fine-tuned into a classifier, it exports with its labels
    from controller.registry.shrink import finetune

    ctx, _ = context(tmp_path / "work-ft")
    tuned = finetune(tmp_path / "out", tmp_path / "classifier", ctx, examples=sentences(60), epochs=1, lr=1e-3)
    assert tuned.params_after < report.params_before
    classifier = export_hf(tmp_path / "classifier", Task.TEXT_CLASSIFICATION, tmp_path / "onnx-classifier")
    assert classifier.spec.postprocess.labels == ["food", "machines", "weather"]

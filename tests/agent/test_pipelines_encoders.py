"""Device pipelines for classification, embeddings (zero-shot) and sensor anomalies, on real bundles.

Bundles are built once per module from seeds (bert-tiny with random weights, the real MiniLM weights,
IsolationForest and autoencoder sensor models); the pipelines load them the way a device does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.inference.pipelines import PipelineError, load_pipeline
from agent.inference.pipelines.classification import ClassificationPipeline
from agent.inference.pipelines.embeddings import EmbeddingPipeline
from agent.inference.session import InputError
from benchmarks.seeds import build_seed
from benchmarks.seeds.encoders import (
    build_anomaly_model,
    inject_anomalies,
    minilm_checkpoint,
    sensor_windows,
    window_features,
)
from controller.registry.convert import ExportedBundle, export_hf
from controller.registry.convert.quantize_int8 import quantize_int8
from wire.manifest import IO, Anomaly, Postprocess, RunSpec, Task, TensorInfo

TEXTS = [
    "ok",
    "The pump in the north warehouse failed again this morning.",
    "",
    "Great service!",
    "the gateway sends a message to the controller every hour and the controller stores it " * 3,
    "Quiet night.",
]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportedBundle, ExportedBundle]:
    root = tmp_path_factory.mktemp("cls")
    checkpoint = build_seed("bert-tiny", root / "checkpoint", task="text-classification")
    fp32 = export_hf(checkpoint, Task.TEXT_CLASSIFICATION, root / "fp32")
    return fp32, quantize_int8(fp32, root / "int8")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportedBundle, ExportedBundle]:
    root = tmp_path_factory.mktemp("minilm")
    fp32 = export_hf(minilm_checkpoint(), Task.EMBEDDINGS, root / "fp32")
    return fp32, quantize_int8(fp32, root / "int8")


def _records(texts: list[str]) -> list[dict[str, Any]]:
    return [{"text": t} for t in texts]


# ---------------------------------------------------------------------------------------------------------
# Tokenization


def test_minilm_short_batch_is_not_padded_to_128(minilm: tuple[ExportedBundle, ExportedBundle]) -> None:
    """MiniLM's tokenizer.json pads to 128: the device resets it to the longest text of the batch."""
    fp32, _ = minilm
    assert isinstance(load_pipeline(fp32.spec, fp32.root), EmbeddingPipeline)
    pipe = EmbeddingPipeline(fp32.spec, fp32.root)
    feeds = pipe.encoder.encode(["hello", "a short sentence", "hi"])
    assert feeds["input_ids"].shape == (3, 5)  # [CLS] a short sentence [SEP]
    assert feeds["input_ids"].dtype == np.int64
    assert feeds["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0]
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    # Truncation follows the manifest (256), not tokenizer.json's 128.
    long = pipe.encoder.encode(["word " * 400])
    assert long["input_ids"].shape == (1, 256)


def test_only_declared_inputs_are_fed(tmp_path: Path) -> None:
    """DistilBERT-style graphs take no token_type_ids: the tokenizer must not produce them."""
    from agent.inference.pipelines.tokenize import TextEncoder

    checkpoint = build_seed("bert-tiny", tmp_path / "ckpt", task="embeddings")
    encoder = TextEncoder(checkpoint / "tokenizer.json", 32, ["input_ids", "attention_mask"])
    assert set(encoder.encode(["a b c"])) == {"input_ids", "attention_mask"}
    with pytest.raises(PipelineError, match="cannot produce"):
        TextEncoder(checkpoint / "tokenizer.json", 32, ["input_ids", "pixel_values"])


def test_lowercase_preprocessing(tmp_path: Path) -> None:
    """preprocess.lowercase serves case-sensitive vocabularies of uncased models; pad ids come from the vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from agent.inference.pipelines.tokenize import TextEncoder

    tokenizer = Tokenizer(models.WordLevel({"<pad>": 0, "[UNK]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    names = ["input_ids", "attention_mask"]
    lowered = TextEncoder(tmp_path / "tokenizer.json", 8, names, lowercase=True)
    assert lowered.encode(["HELLO World", "hello"])["input_ids"].tolist() == [[2, 3], [2, 0]]
    cased = TextEncoder(tmp_path / "tokenizer.json", 8, names, lowercase=False)
    assert cased.encode(["HELLO World"])["input_ids"].tolist() == [[1, 1]]


# ---------------------------------------------------------------------------------------------------------
# Classification


def test_classification_results(classifier: tuple[ExportedBundle, ExportedBundle]) -> None:
    fp32, _ = classifier
    pipe = load_pipeline(fp32.spec, fp32.root)
    pipe.warmup()
    results = pipe.run(_records(TEXTS))
    assert len(results) == len(TEXTS)
    for result in results:
        assert set(result) == {"label", "score", "scores", "logits"}
        assert list(result["scores"]) == ["negative", "neutral", "positive"]
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["score"] == max(result["scores"].values())
        assert result["scores"][result["label"]] == result["score"]


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_classification_batch_equals_single(classifier: tuple[ExportedBundle, ExportedBundle], variant: str) -> None:
    bundle = classifier[0] if variant == "fp32" else classifier[1]
    assert isinstance(load_pipeline(bundle.spec, bundle.root), ClassificationPipeline)
    pipe = ClassificationPipeline(bundle.spec, bundle.root)
    batch = pipe.run(_records(TEXTS))
    single = [pipe.run([r])[0] for r in _records(TEXTS)]
    for b, s in zip(batch, single, strict=True):
        assert b["label"] == s["label"]
        for label, p in b["scores"].items():
            assert p == pytest.approx(s["scores"][label], abs=1e-6)
    if variant == "int8":
        # Dynamic int8 runs row by row, so a result cannot depend on its batch neighbours at all.
        assert pipe.max_batch == 1
        assert batch == single


def test_classification_without_labels_says_label_i(classifier: tuple[ExportedBundle, ExportedBundle]) -> None:
    fp32, _ = classifier
    spec = fp32.spec.model_copy(update={"postprocess": Postprocess()})
    result = load_pipeline(spec, fp32.root).run([{"text": "hello"}])[0]
    assert set(result["scores"]) == {"LABEL_0", "LABEL_1", "LABEL_2"}
    assert result["label"].startswith("LABEL_")


def test_classification_label_count_mismatch_is_refused(classifier: tuple[ExportedBundle, ExportedBundle]) -> None:
    fp32, _ = classifier
    spec = fp32.spec.model_copy(update={"postprocess": Postprocess(labels=["a", "b"])})
    with pytest.raises(PipelineError, match="2 labels"):
        load_pipeline(spec, fp32.root)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"txt": "hello"}, "no 'text'"),
        ({"text": 42}, "must be a string"),
        ({"text": None}, "must be a string"),
        ("just a string", "JSON object"),
    ],
)
def test_text_bad_inputs(classifier: tuple[ExportedBundle, ExportedBundle], record: Any, message: str) -> None:
    fp32, _ = classifier
    pipe = load_pipeline(fp32.spec, fp32.root)
    with pytest.raises(InputError, match=message):
        pipe.run([record])
    results = pipe.run([{"text": "fine"}, record, {"text": "also fine"}])
    assert message in results[1]["error"]
    assert results[0]["label"] and results[2]["label"]
    assert results[0] == pipe.run([{"text": "fine"}])[0]


def test_stream_is_refused_for_non_generation(classifier: tuple[ExportedBundle, ExportedBundle]) -> None:
    fp32, _ = classifier
    with pytest.raises(InputError, match="generation"):
        next(iter(load_pipeline(fp32.spec, fp32.root).stream({"text": "x"})))


def test_missing_tokenizer_is_a_load_error(classifier: tuple[ExportedBundle, ExportedBundle], tmp_path: Path) -> None:
    fp32, _ = classifier
    (tmp_path / "model.onnx").symlink_to(fp32.root / "model.onnx")
    with pytest.raises(PipelineError, match="tokenizer"):
        load_pipeline(fp32.spec, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Embeddings


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_embeddings_batch_equals_single(minilm: tuple[ExportedBundle, ExportedBundle], variant: str) -> None:
    bundle = minilm[0] if variant == "fp32" else minilm[1]
    pipe = load_pipeline(bundle.spec, bundle.root)
    batch = np.asarray([r["embedding"] for r in pipe.run(_records(TEXTS))])
    single = np.asarray([pipe.run([r])[0]["embedding"] for r in _records(TEXTS)])
    assert batch.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    if variant == "fp32":
        assert np.max(np.abs(batch - single)) < 1e-5
    else:
        assert np.array_equal(batch, single)


def test_zero_shot_labels(minilm: tuple[ExportedBundle, ExportedBundle]) -> None:
    fp32, _ = minilm
    labels = {
        "weather": "weather forecast: rain, snow, wind and temperature",
        "finance": "money, banks, interest rates and the stock market",
        "sport": "sports: football matches, tennis players and athletes",
    }
    spec = fp32.spec.model_copy(
        update={"postprocess": fp32.spec.postprocess.model_copy(update={"zero_shot_labels": labels})}
    )
    pipe = load_pipeline(spec, fp32.root)
    texts = {
        "Heavy snow and strong winds are expected tonight.": "weather",
        "The central bank raised interest rates again.": "finance",
        "The striker scored twice in the second half.": "sport",
        "Shares of the company fell ten percent on Monday.": "finance",
        "It will be sunny and warm all weekend.": "weather",
        "She won the tennis final in straight sets.": "sport",
    }
    results = pipe.run(_records(list(texts)))
    assert [r["label"] for r in results] == list(texts.values())
    plain = load_pipeline(fp32.spec, fp32.root).run(_records(list(texts)))
    for r, p in zip(results, plain, strict=True):
        assert -1.0 <= r["score"] <= 1.0
        assert r["embedding"] == p["embedding"]
        assert "label" not in p


@pytest.fixture(scope="module")
def hidden_state_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportedBundle, ExportedBundle]:
    """A bert-tiny graph that returns last_hidden_state (device pooling) and the same model pooled in-graph."""
    import torch

    root = tmp_path_factory.mktemp("hidden")
    checkpoint = build_seed("bert-tiny", root / "checkpoint", task="embeddings")
    pooled = export_hf(checkpoint, Task.EMBEDDINGS, root / "pooled", normalize=False)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoint, local_files_only=True, attn_implementation="eager").eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state

    out = root / "hidden"
    out.mkdir()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    sample = (torch.ones(1, 4, dtype=torch.int64),) * 3
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"last_hidden_state": {0: "batch", 1: "sequence"}}
    torch.onnx.export(
        Hidden(),
        sample,
        str(out / "model.onnx"),
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )
    (out / "tokenizer.json").write_bytes((checkpoint / "tokenizer.json").read_bytes())
    spec = pooled.spec.model_copy(
        update={
            "io": IO(
                inputs=pooled.spec.io.inputs,
                outputs=[TensorInfo(name="last_hidden_state", dtype="float32", shape=["batch", "sequence", 128])],
            ),
            "preprocess": pooled.spec.preprocess.model_copy(update={"pooling": "mean"}),
        }
    )
    return pooled, ExportedBundle(root=out, spec=spec)


def test_device_pooling_matches_in_graph_pooling(hidden_state_bundle: tuple[ExportedBundle, ExportedBundle]) -> None:
    pooled, hidden = hidden_state_bundle
    want = np.asarray([r["embedding"] for r in load_pipeline(pooled.spec, pooled.root).run(_records(TEXTS))])
    mean = np.asarray([r["embedding"] for r in load_pipeline(hidden.spec, hidden.root).run(_records(TEXTS))])
    assert np.max(np.abs(mean - want)) < 1e-5
    normalized = hidden.spec.model_copy(update={"postprocess": Postprocess(normalize=True)})
    unit = np.asarray([r["embedding"] for r in load_pipeline(normalized, hidden.root).run(_records(TEXTS))])
    assert np.allclose(unit, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    cls_spec = hidden.spec.model_copy(
        update={"preprocess": hidden.spec.preprocess.model_copy(update={"pooling": "cls"})}
    )
    cls = load_pipeline(cls_spec, hidden.root)
    first = np.asarray(cls.run(_records(TEXTS))[1]["embedding"])
    assert first.shape == (128,) and not np.allclose(first, mean[1], atol=1e-3)
    # A pooled graph cannot be pooled again: the manifest and the graph disagree.
    with pytest.raises(PipelineError, match="rank"):
        load_pipeline(pooled.spec.model_copy(update={"preprocess": cls_spec.preprocess}), pooled.root)


# ---------------------------------------------------------------------------------------------------------
# Sensor anomalies


@pytest.fixture(scope="module")
def forest(tmp_path_factory: pytest.TempPathFactory) -> ExportedBundle:
    return build_anomaly_model(tmp_path_factory.mktemp("forest"), n_train=2000, seed=3)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory: pytest.TempPathFactory) -> ExportedBundle:
    return build_anomaly_model(tmp_path_factory.mktemp("ae"), kind="autoencoder", n_train=2000, seed=3)


def _windows(array: np.ndarray) -> list[dict[str, Any]]:
    return [{"values": [float(v) for v in row]} for row in array]


@pytest.mark.parametrize("kind", ["forest", "autoencoder"])
def test_anomaly_flags_injected_faults(kind: str, request: pytest.FixtureRequest) -> None:
    bundle: ExportedBundle = request.getfixturevalue(kind)
    pipe = load_pipeline(bundle.spec, bundle.root)
    normal = pipe.run(_windows(sensor_windows(400, 32, seed=21)))
    broken = pipe.run(_windows(inject_anomalies(sensor_windows(200, 32, seed=22), seed=23)))
    false_positive = np.mean([r["anomaly"] for r in normal])
    detected = np.mean([r["anomaly"] for r in broken])
    assert detected >= 0.9, f"{kind}: only {detected:.2f} of the injected faults flagged"
    assert false_positive <= 0.05, f"{kind}: {false_positive:.2f} of normal windows flagged"
    for r in normal + broken:
        assert set(r) == {"score", "anomaly"} and math.isfinite(r["score"])


def test_forest_matches_scikit_learn(forest: ExportedBundle) -> None:
    from sklearn.ensemble import IsolationForest

    assert forest.spec.anomaly is not None
    train = sensor_windows(2000, 32, seed=3)
    reference = IsolationForest(n_estimators=100, random_state=3).fit(window_features(train))
    windows = np.concatenate([sensor_windows(300, 32, seed=31), inject_anomalies(sensor_windows(100, 32, seed=32))])
    expected = reference.decision_function(window_features(windows))
    results = load_pipeline(forest.spec, forest.root).run(_windows(windows))
    scores = np.asarray([r["score"] for r in results])
    assert np.max(np.abs(scores - expected)) < 1e-4
    threshold = forest.spec.anomaly.threshold
    decided = np.asarray([r["anomaly"] for r in results])
    # Only a score within float32 rounding of the threshold may decide differently from float64 sklearn.
    clear = np.abs(expected - threshold) > 1e-4
    assert np.array_equal(decided[clear], (expected < threshold)[clear])
    assert clear.mean() > 0.95


@pytest.mark.parametrize("kind", ["forest", "autoencoder"])
def test_anomaly_batch_equals_single(kind: str, request: pytest.FixtureRequest) -> None:
    bundle: ExportedBundle = request.getfixturevalue(kind)
    pipe = load_pipeline(bundle.spec, bundle.root)
    records = _windows(inject_anomalies(sensor_windows(12, 32, seed=41)))[:6] + _windows(sensor_windows(6, 32))
    batch = pipe.run(records)
    single = [pipe.run([r])[0] for r in records]
    for b, s in zip(batch, single, strict=True):
        assert b["anomaly"] == s["anomaly"]
        assert b["score"] == pytest.approx(s["score"], abs=1e-6)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"values": [1.0] * 31}, "31 values"),
        ({"values": [1.0] * 31 + [float("nan")]}, "non-finite"),
        ({"values": [1.0] * 31 + [float("inf")]}, "non-finite"),
        ({"values": [1.0] * 31 + ["7"]}, "numbers only"),
        ({"values": [1.0] * 31 + [True]}, "numbers only"),
        ({"values": "1,2,3"}, "list of 32"),
        ({}, "list of 32"),
        (["not", "a", "record"], "JSON object"),
    ],
)
def test_anomaly_bad_inputs(forest: ExportedBundle, record: Any, message: str) -> None:
    pipe = load_pipeline(forest.spec, forest.root)
    with pytest.raises(InputError, match=message):
        pipe.run([record])
    good = {"values": [20.0] * 32}
    results = pipe.run([good, record])
    assert message in results[1]["error"]
    assert results[0] == pipe.run([good])[0]


def _score_model(path: Path, n: int, out_shape: list[Any], reshape: list[int] | None) -> None:
    """A hand-written graph scoring each window by its mean, with the output shape skl2onnx might give."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1)]
    inits = []
    last = "m"
    if reshape is not None:
        inits.append(numpy_helper.from_array(np.asarray(reshape, dtype=np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["m", "shape"], ["r"]))
        last = "r"
    nodes.append(helper.make_node("Identity", [last], ["score"]))
    graph = helper.make_graph(
        nodes,
        "score",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    ("out_shape", "reshape"),
    [([None, 1], None), ([None], [-1]), ([None, 1, 1], [-1, 1, 1])],
    ids=["batch-by-1", "flattened", "batch-by-1-by-1"],
)
def test_anomaly_output_layouts(tmp_path: Path, out_shape: list[Any], reshape: list[int] | None) -> None:
    _score_model(tmp_path / "model.onnx", 4, out_shape, reshape)
    spec = RunSpec(
        task=Task.ANOMALY,
        io=IO(inputs=[TensorInfo(name="x", dtype="float32", shape=[None, 4])], outputs=[]),
        anomaly=Anomaly(input="x", output="score", n_features=4, threshold=10.0),
    )
    pipe = load_pipeline(spec, tmp_path)
    results = pipe.run([{"values": [1, 2, 3, 4]}, {"values": [20, 20, 20, 21]}])
    assert results == [{"score": 2.5, "anomaly": False}, {"score": 20.25, "anomaly": True}]
    lower = spec.model_copy(
        update={"anomaly": Anomaly(input="x", output="score", n_features=4, threshold=10.0, higher_is_anomalous=False)}
    )
    assert [r["anomaly"] for r in load_pipeline(lower, tmp_path).run([{"values": [1, 2, 3, 4]}])] == [True]


def test_anomaly_manifest_mismatch_is_a_load_error(forest: ExportedBundle) -> None:
    assert forest.spec.anomaly is not None
    wrong_width = forest.spec.model_copy(update={"anomaly": forest.spec.anomaly.model_copy(update={"n_features": 16})})
    with pytest.raises(PipelineError, match="windows of 32"):
        load_pipeline(wrong_width, forest.root)
    wrong_output = forest.spec.model_copy(update={"anomaly": forest.spec.anomaly.model_copy(update={"output": "nope"})})
    with pytest.raises(PipelineError, match="output 'nope'"):
        load_pipeline(wrong_output, forest.root)

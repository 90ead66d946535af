"""Small real models built in the tests: an ONNX text classifier with a WordLevel tokenizer, and a
scikit-learn anomaly detector converted with skl2onnx."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = ["good", "great", "fine", "happy", "bad", "awful", "sad", "broken"] + [
    "the",
    "is",
    "very",
    "not",
    "device",
    "sensor",
    "pump",
    "ok",
    "a",
    "an",
    "and",
    "are",
    "at",
    "be",
    "by",
    "for",
    "from",
    "has",
    "have",
    "in",
    "it",
    "its",
    "of",
    "on",
    "or",
    "that",
    "this",
    "to",
    "was",
    "were",
    "will",
    "with",
    "valve",
    "motor",
    "line",
    "station",
    "reading",
    "today",
    "yesterday",
    "morning",
    "evening",
    "noise",
    "heat",
    "pressure",
    "flow",
    "level",
    "alarm",
    "signal",
    "report",
    "north",
    "south",
    "east",
    "west",
    "first",
    "second",
    "third",
]


def word_tokenizer(path: Path) -> Path:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.save(str(path))
    return path


def text_classifier(out_dir: Path, *, labels: tuple[str, ...] = ("negative", "positive")) -> Path:
    """mean(embedding[input_ids] * mask) @ W -> logits; positive words push towards 'positive'."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = len(WORDS) + 2
    dim = 8
    rng = np.random.default_rng(0)
    emb = rng.normal(0, 0.1, (vocab, dim)).astype(np.float32)
    for w in ("good", "great", "fine", "happy", "ok"):
        emb[WORDS.index(w) + 2, 0] += 2.0
    for w in ("bad", "awful", "sad", "broken"):
        emb[WORDS.index(w) + 2, 1] += 2.0
    w_out = np.zeros((dim, len(labels)), dtype=np.float32)
    w_out[1, 0] = 1.0
    w_out[0, 1] = 1.0
    w_out += rng.normal(0, 0.01, w_out.shape).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"]),  # [b, s, d]
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["tok", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_f", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "w_out"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-text-classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(labels)])],
        initializer=[
            onnx.numpy_helper.from_array(emb, "emb"),
            onnx.numpy_helper.from_array(w_out, "w_out"),
            onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
            onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            onnx.numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, out_dir / "model.onnx")
    word_tokenizer(out_dir / "tokenizer.json")
    (out_dir / "config.json").write_text(json.dumps({"id2label": {str(i): lab for i, lab in enumerate(labels)}}))
    return out_dir


def anomaly_model(path: Path, seed: int = 0, trees: int = 50) -> tuple[Path, float]:
    """An IsolationForest on 8-feature sensor windows. Its ``scores`` output is scikit-learn's
    decision_function: below the returned threshold (0) means anomalous. ``seed`` varies the forest."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import IsolationForest

    rng = np.random.default_rng(1)
    normal = rng.normal(0, 1, (2000, 8)).astype(np.float32)
    forest = IsolationForest(n_estimators=trees, random_state=seed).fit(normal)
    onx = to_onnx(forest, normal[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
    return path, 0.0

"""Small real ONNX models a scenario registers with the controller, built on the spot.

``text_classifier`` is the tiny word-level classifier of the test suite with a dense hidden layer whose
size the scenario chooses (``size_mb``): the registry then quantizes it into fp32, int8 and int4 variants of
very different sizes and memory needs, which is what variant choice per device profile is about. The
hidden layer adds a small contribution to the logits, so every variant answers like fp32 on the
registry's evaluation texts (its agreement floor) while its weights still dominate the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: The vocabulary: sentiment words first, then filler words a sensor report might use.
_FILLER = (
    "the is very not device sensor pump ok a an and are at be by for from has have in it its of on or that this"
    " to was were will with valve motor line station reading today yesterday morning evening noise heat pressure"
    " flow level alarm signal report north south east west first second third"
)
WORDS = ["good", "great", "fine", "happy", "bad", "awful", "sad", "broken", *_FILLER.split()]
POSITIVE = ("good", "great", "fine", "happy", "ok")
NEGATIVE = ("bad", "awful", "sad", "broken")
#: the embedding width of the classifier
EMBED_DIM = 64


def word_tokenizer(path: Path, words: list[str] | None = None) -> Path:
    """A WordLevel tokenizer over ``words`` (default ``WORDS``) saved as ``tokenizer.json``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words or WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.save(str(path))
    return path


def text_classifier(
    out_dir: Path,
    *,
    size_mb: float = 1.0,
    seed: int = 0,
    labels: tuple[str, ...] = ("negative", "positive"),
    compute: int = 1,
    missing_words: tuple[str, ...] = (),
) -> Path:
    """Write ``model.onnx``, ``tokenizer.json`` and ``config.json`` of a classifier of about ``size_mb`` MB.

    logits = pooled @ W_direct + 0.01 * relu(pooled @ W1) @ W2, where pooled is the masked mean of the
    word embeddings; positive words push towards the last label. ``seed`` changes the hidden weights
    (another version whose files differ but whose answers agree).

    Two real defects for a bad version: ``compute`` > 1 evaluates the hidden layer on that many copies of
    the pooled vector and averages them (the same answers, the same file, ``compute`` times the hidden
    layer's work: a genuinely slower model); ``missing_words`` get the last ids of the vocabulary and the
    embedding table stops before them, so onnxruntime fails any input holding one (Gather out of range),
    while every other input, the agent's self-test sample among them, runs as before.
    """
    import onnx
    from onnx import TensorProto, helper

    unknown = sorted(set(missing_words) - set(WORDS))
    if unknown:
        raise ValueError(f"missing_words not in the classifier's vocabulary: {', '.join(unknown)}")
    if compute < 1:
        raise ValueError(f"compute must be at least 1, not {compute}")
    words = [w for w in WORDS if w not in missing_words] + [w for w in WORDS if w in missing_words]
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = len(words) + 2 - len(missing_words)
    dim = EMBED_DIM
    hidden = max(32, int(size_mb * 1e6 / 4 / dim) // 32 * 32)
    rng = np.random.default_rng(seed)
    emb = rng.normal(0, 0.1, (vocab, dim)).astype(np.float32)
    for w in POSITIVE:
        emb[words.index(w) + 2, 0] += 2.0
    for w in NEGATIVE:
        emb[words.index(w) + 2, 1] += 2.0
    n = len(labels)
    w_direct = np.zeros((dim, n), dtype=np.float32)
    w_direct[1, 0] = 1.0
    w_direct[0, n - 1] = 1.0
    w1 = rng.normal(0, 1.0 / np.sqrt(dim), (dim, hidden)).astype(np.float32)
    w2 = (rng.normal(0, 1.0 / np.sqrt(hidden), (hidden, n)) * 0.01).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["tok", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_f", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "w_direct"], ["direct"]),
    ]
    constants = []
    if compute == 1:
        hidden_in = "pooled"
    else:  # [batch, compute, dim]: the same row ``compute`` times, each through the hidden layer
        nodes += [
            helper.make_node("Unsqueeze", ["pooled", "axis1"], ["pooled3"]),
            helper.make_node("Expand", ["pooled3", "copies"], ["hidden_in"]),
        ]
        constants.append(onnx.numpy_helper.from_array(np.array([1, compute, 1], dtype=np.int64), "copies"))
        hidden_in = "hidden_in"
    nodes += [
        helper.make_node("MatMul", [hidden_in, "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["h_relu"]),
        helper.make_node("MatMul", ["h_relu", "w2"], ["extra" if compute == 1 else "extra3"]),
    ]
    if compute > 1:
        nodes.append(helper.make_node("ReduceMean", ["extra3"], ["extra"], axes=[1], keepdims=0))
    nodes.append(helper.make_node("Add", ["direct", "extra"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "sim-text-classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n])],
        initializer=[
            onnx.numpy_helper.from_array(emb, "emb"),
            onnx.numpy_helper.from_array(w_direct, "w_direct"),
            onnx.numpy_helper.from_array(w1, "w1"),
            onnx.numpy_helper.from_array(w2, "w2"),
            onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
            onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            onnx.numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"),
            *constants,
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, out_dir / "model.onnx")
    word_tokenizer(out_dir / "tokenizer.json", words)
    (out_dir / "config.json").write_text(json.dumps({"id2label": {str(i): lab for i, lab in enumerate(labels)}}))
    return out_dir

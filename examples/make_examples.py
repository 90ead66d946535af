"""Write the example models the README's first hour uses (the files next to this script are its output).

    .venv/bin/python examples/make_examples.py [OUT_DIR]      # default: this directory

Everything is trained here on generated data, deterministically (fixed seeds), with numpy, onnx and
tokenizers only (the controller extra), so nothing is downloaded:

- ``pump/pump-v1.onnx``, ``pump/pump-v2.onnx``: anomaly models for windows of 16 pressure readings of a
  piston pump (PCA reconstruction error; v2 is refit on more data). ``pump/options.json`` holds the import
  options (the threshold), ``pump/windows.jsonl`` sample windows, normal and anomalous.
- ``sentiment/``: a bundle (model.onnx, tokenizer.json, config.json with the labels) of a small text
  classifier (negative/positive) trained on the short maintenance notes below; ``sentiment-texts.jsonl``
  sample inputs.
- ``first-rollout.json``: a rollout plan for a first try on two devices.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

WINDOW = 16  # readings per window (10 Hz: 1.6 s)
STROKE = 8  # samples per pump stroke: the pressure pulsates with this period
OPSET = 17


def pump_windows(n: int, rng: np.random.Generator) -> np.ndarray:
    """Normal windows: a level of about 4 bar, a pulsation per stroke, sensor noise."""
    t = np.arange(WINDOW)
    level = rng.normal(4.0, 0.3, (n, 1))
    amplitude = rng.uniform(0.2, 0.4, (n, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    noise = rng.normal(0.0, 0.03, (n, WINDOW))
    return level + amplitude * np.sin(2 * np.pi * t / STROKE + phase) + noise


def pump_anomalies(n: int, rng: np.random.Generator) -> np.ndarray:
    """Cavitation spikes, a pressure drop within the window, and chatter (a loose valve)."""
    windows = pump_windows(n, rng)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            at = rng.integers(0, WINDOW, 2)
            windows[i, at] -= rng.uniform(1.0, 2.0, 2)
        elif kind == 1:
            windows[i, int(rng.integers(4, 12)) :] -= rng.uniform(0.8, 1.5)
        else:
            windows[i] += rng.normal(0.0, 0.3, WINDOW)
    return windows


def pca_scorer(train: np.ndarray, components: int, name: str) -> tuple[object, float]:
    """An ONNX graph scoring a window by its mean squared distance to the normal subspace, and a threshold."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    basis = vt[:components].T.astype(np.float32)  # [WINDOW, components]
    residual = (train - mean) - (train - mean) @ basis @ basis.T
    scores = (residual**2).mean(axis=1)
    threshold = float(np.quantile(scores, 0.999) * 2.0)
    nodes = [
        helper.make_node("Sub", ["values", "mean"], ["centered"]),
        helper.make_node("MatMul", ["centered", "basis"], ["coded"]),
        helper.make_node("MatMul", ["coded", "basis_t"], ["rebuilt"]),
        helper.make_node("Sub", ["centered", "rebuilt"], ["residual"]),
        helper.make_node("Mul", ["residual", "residual"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["score"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", WINDOW])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])],
        initializer=[
            numpy_helper.from_array(mean.astype(np.float32), "mean"),
            numpy_helper.from_array(basis, "basis"),
            numpy_helper.from_array(np.ascontiguousarray(basis.T), "basis_t"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="slmfleet-examples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, threshold


def write_pump(out: Path) -> None:
    import onnx

    rng = np.random.default_rng(7)
    out.mkdir(parents=True, exist_ok=True)
    v1, threshold = pca_scorer(pump_windows(2_000, rng), 4, "pump-anomaly-v1")
    v2, threshold2 = pca_scorer(pump_windows(20_000, rng), 4, "pump-anomaly-v2")
    onnx.save(v1, out / "pump-v1.onnx")
    onnx.save(v2, out / "pump-v2.onnx")
    options = {
        "description": "pump pressure windows (16 readings at 10 Hz): PCA reconstruction error",
        "anomaly": {"threshold": round(max(threshold, threshold2), 6), "higher_is_anomalous": True},
    }
    (out / "options.json").write_text(json.dumps(options, indent=2) + "\n")
    samples = np.concatenate([pump_windows(6, rng), pump_anomalies(3, rng)])
    with open(out / "windows.jsonl", "w") as f:
        for i, window in enumerate(samples):
            f.write(json.dumps({"id": f"w{i + 1}", "values": [round(float(v), 3) for v in window]}) + "\n")


# ------------------------------------------------------------------------------------------ sentiment --

POSITIVE = """
the pump runs smoothly and quietly after the repair
great job, the new valve works perfectly
pressure is stable and the readings look good
the technician was quick and helpful
excellent service, everything works again
the sensor is accurate and reliable
very happy with the new firmware, it is fast
the station is clean, safe and running well
good news: no alarms this week
the motor starts fine and sounds healthy
flow is steady, all checks passed
thanks, the update fixed the noise
reliable gateway, no downtime this month
the replacement part fits and works well
support answered fast and solved it
the line is back to normal, great work
""".strip().splitlines()
NEGATIVE = """
the pump is broken and leaking oil
terrible noise from the motor again
pressure keeps dropping, the valve is stuck
the sensor failed and reports garbage
awful service, nobody came to fix it
the gateway crashed twice today
alarm after alarm, the station is unsafe
the update made everything slow and buggy
the seal is worn and the flow is weak
bad readings, the device keeps rebooting
the motor overheats and smells burnt
still waiting for the repair, very frustrating
the replacement part does not fit
the line is down again, this is a disaster
vibration is worse than last week
support never answered, poor and slow
""".strip().splitlines()
FILLER = (
    "a an and at be by for from has have in it its of on or that this to was were will with north south east"
    " west first second third morning evening today yesterday report reading level heat filter tank hose"
)
LABELS = ("negative", "positive")
EMBED_DIM = 16


def _words(text: str) -> list[str]:
    return text.lower().replace(",", " ").replace(":", " ").replace(".", " ").split()


def write_sentiment(out: Path, texts_file: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    out.mkdir(parents=True, exist_ok=True)
    texts = POSITIVE + NEGATIVE
    labels = np.array([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    words = sorted({w for t in texts for w in _words(t)} | set(FILLER.split()))
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.save(str(out / "tokenizer.json"))

    # mean of word embeddings, then a linear layer; trained with full-batch gradient descent
    encoded = [tokenizer.encode(t).ids for t in texts]
    rng = np.random.default_rng(11)
    emb = rng.normal(0.0, 0.1, (len(vocab), EMBED_DIM))
    emb[0] = 0.0
    weights = rng.normal(0.0, 0.1, (EMBED_DIM, 2))
    bias = np.zeros(2)
    for _ in range(600):
        pooled = np.stack([emb[ids].mean(axis=0) for ids in encoded])
        logits = pooled @ weights + bias
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        grad = probs.copy()
        grad[np.arange(len(texts)), labels] -= 1.0
        grad /= len(texts)
        grad_pooled = grad @ weights.T
        weights -= 2.0 * (pooled.T @ grad + 1e-3 * weights)
        bias -= 2.0 * grad.sum(axis=0)
        for ids, g in zip(encoded, grad_pooled, strict=True):
            np.add.at(emb, ids, -2.0 * g / len(ids))
        emb[1:] -= 2.0 * 1e-3 * emb[1:]
    accuracy = float((np.argmax(np.stack([emb[i].mean(axis=0) for i in encoded]) @ weights + bias, 1) == labels).mean())
    if accuracy < 1.0:
        raise SystemExit(f"the example classifier did not learn its training notes (accuracy {accuracy:.2f})")

    nodes = [
        helper.make_node("Gather", ["embeddings", "input_ids"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
        helper.make_node("Mul", ["tokens", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "seq"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask", "seq"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "weights"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "maintenance-notes-sentiment",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])],
        initializer=[
            numpy_helper.from_array(emb.astype(np.float32), "embeddings"),
            numpy_helper.from_array(weights.astype(np.float32), "weights"),
            numpy_helper.from_array(bias.astype(np.float32), "bias"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "last"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "seq"),
            numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="slmfleet-examples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out / "model.onnx")
    config = {"id2label": {str(i): label for i, label in enumerate(LABELS)}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    samples = [
        "the new valve works great",
        "the motor is broken again",
        "pressure is stable this morning",
        "terrible vibration on the second pump",
    ]
    texts_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in samples))


FIRST_ROLLOUT = {
    "waves": [
        {"name": "canary", "until": 1, "bake_s": 5},
        {"name": "rest", "until": "100%", "bake_s": 5},
    ],
    # the default thresholds but latency; the quick start's devices get traffic from pump/traffic.sh a few
    # seconds before the rollout, so the warm-up and the samples a device needs are shorter than the defaults.
    # Latency 1.5: agents, controller and traffic share one machine, whose load moves their latency
    "gates": {"min_samples": 100, "warmup_s": 5, "deadline_s": 300, "p95_latency_ratio_max": 1.5},
}


def main(out: Path) -> None:
    write_pump(out / "pump")
    write_sentiment(out / "sentiment", out / "sentiment-texts.jsonl")
    (out / "first-rollout.json").write_text(json.dumps(FIRST_ROLLOUT, indent=2) + "\n")
    print(f"wrote the examples to {out}")  # noqa: T201


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)

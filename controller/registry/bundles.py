"""Recognising what was uploaded and checking that an ONNX bundle fits its declared task."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controller.registry.convert import ConversionError
from wire.manifest import (
    IO,
    Budget,
    Task,
    TensorInfo,
)

log = logging.getLogger(__name__)

HINTS_FILE = "slmfleet.json"
VARIANTS = ("fp32", "int8", "int4")
QUANTIZATION_OF = {"int8": "int8-dynamic", "int4": "int4-weight-only"}


class BundleError(Exception):
    """The upload is not a usable model bundle; the message says what is wrong and what to do."""


class AnomalyOptions(BaseModel):
    """How to read an anomaly model's outputs; everything the graph says itself may be left out."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(
        None,
        description="the score at which a window becomes an anomaly; needed only when the graph has no label"
        " output (skl2onnx's outlier detectors and classifiers have one)",
    )
    higher_is_anomalous: bool | None = Field(
        None,
        description="true: a score above the threshold is an anomaly (reconstruction errors); false: below it"
        " (scikit-learn's decision_function). Needed only when the graph has no label output",
    )
    normal_label: int | str | None = Field(
        None,
        description="the label of a normal window; read from the graph for scikit-learn outlier detectors (1)"
        " and for classifiers whose classes include 'normal' (or are 0/1: 0)",
    )
    input: str | None = Field(None, description="the graph input that takes the window (default: its only input)")
    output: str | None = Field(None, description="the graph output that holds the score (default: found by name)")
    n_features: Annotated[int, Field(ge=1)] | None = Field(
        None, description="the window length, when the graph does not fix it"
    )


class GenerationOptions(BaseModel):
    """Decoding settings; the special ids default to what the model's configuration files say."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: Annotated[int, Field(ge=1, le=100_000)] | None = Field(
        None, description="tokens generated when a request does not say (default: generation_config.json, else 64)"
    )
    eos_token_id: Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="end-of-sequence id(s), an int or a list as Hugging Face writes them"
    )
    pad_token_id: Annotated[int, Field(ge=0)] | None = None
    bos_token_id: Annotated[int, Field(ge=0)] | None = None
    decoder_start_token_id: Annotated[int, Field(ge=0)] | None = Field(
        None, description="first decoder token of an encoder-decoder (T5: the pad id)"
    )
    do_sample: bool | None = Field(None, description="sample instead of greedy decoding")
    temperature: Annotated[float, Field(gt=0, le=100)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None


class ReferenceCase(BaseModel):
    """One input and the outputs the model's own framework gave for it."""

    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any] = Field(description='a record as the device takes it, e.g. {"text": "..."}')
    expected: dict[str, Any] = Field(
        description="outputs to compare: logits, embedding, score or scores (within the tolerance); label,"
        " anomaly, token_ids or text (exactly)"
    )


class ImportOptions(BaseModel):
    """What the operator says about an upload (the ``options`` form field, or ``slmfleet.json`` in a bundle).

    Every field may be left out: the import reads the task, limits, special ids, labels, pooling and
    anomaly decisions from the model's own files and asks only for what they do not say.
    """

    model_config = ConfigDict(extra="forbid")

    task: Task | None = Field(
        None, description="what the model does; default: read from the files (config.json, modules.json, graphs)"
    )
    description: Annotated[str, Field(max_length=4096)] = ""
    variants: list[Literal["fp32", "int8", "int4"]] | None = Field(
        None, description="variants to build; default fp32+int8 (and int4 for text-generation and text2text)"
    )
    labels: list[Annotated[str, Field(max_length=128)]] | None = Field(
        None, description="class names of a text classifier, in logit order (default: config.json id2label)"
    )
    zero_shot_labels: dict[str, str] | None = Field(
        None, description="embeddings: label -> description; the device answers the closest label"
    )
    max_length: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        None,
        description="longest input (encoders) or context (generation) in tokens; default and upper bound: the"
        " model's own limit (config.json max_position_embeddings/n_positions, tokenizer_config.json"
        " model_max_length, genai_config.json context_length)",
    )
    pooling: Literal["none", "mean", "cls", "max", "lasttoken"] | None = Field(
        None,
        description="embeddings: how to pool hidden states; default: sentence-transformers' Pooling config, else mean",
    )
    normalize: bool | None = Field(
        None, description="embeddings: L2-normalize; default: sentence-transformers' Normalize module, else true"
    )
    anomaly: AnomalyOptions | None = None
    generation: GenerationOptions | None = None
    runtime: Literal["auto", "onnxruntime", "onnxruntime-genai"] = Field(
        "auto", description="Hugging Face checkpoints of text generation: which runtime's export to build"
    )
    eval_set: Annotated[list[dict[str, Any]], Field(max_length=5000)] | None = Field(
        None, description="records to compare the variants with fp32 on (default: generated from the vocabulary)"
    )
    reference: Annotated[list[ReferenceCase], Field(max_length=1000)] | None = Field(
        None,
        description="inputs with the outputs the model's framework gave: fp32 must match them (within"
        " reference_tolerance) or the import fails; each variant's match is recorded",
    )
    reference_tolerance: Annotated[float, Field(ge=0, le=1)] = Field(
        1e-4, description="largest difference allowed per value: |got - expected| <= t + t * |expected|"
    )
    min_agreement: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="refuse variants that agree with fp32 less than this (default: the registry's floors)"
    )
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

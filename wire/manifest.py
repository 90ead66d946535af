"""The artifact manifest: what a model variant is, how to run it, and how to fetch and verify it.

A manifest describes one **artifact**: a bundle of files (ONNX graphs and
their external data, tokenizer, ...) for one variant (fp32, int8, int4, ...)
of one immutable model version. The controller signs it (``signing``); the
agent verifies it, fetches the files chunk by chunk, checks every hash, and
builds the inference pipeline from the ``task`` and its settings, so a new
model needs no new code on the device.

Bundle layouts by task (paths are relative to the bundle root):

* ``text-classification``: ``model.onnx`` taking ``input_ids``,
  ``attention_mask`` (and ``token_type_ids`` if the graph has it), int64
  ``[batch, seq]``; output ``logits [batch, n_labels]``; ``tokenizer.json``;
  ``labels`` in ``postprocess``.
* ``embeddings``: same inputs; output named by ``io.outputs[0]``; when
  ``preprocess.pooling`` is ``none`` the graph already pools (and normalizes
  if ``postprocess.normalize`` says so is done); ``mean`` or ``cls`` pool a
  ``last_hidden_state`` output on the device. ``postprocess.zero_shot_labels``
  maps a label to a description the device embeds once at load time.
* ``text-generation``: either ``runtime = onnxruntime-genai`` and the bundle is
  an onnxruntime-genai model folder (``genai_config.json``, model, tokenizer),
  or ``runtime = onnxruntime`` with ``decoder.onnx`` taking ``input_ids``,
  ``attention_mask`` (``position_ids`` if present) and ``past_key_values.{i}.key|value``
  and returning ``logits`` and ``present.{i}.key|value``; ``generation`` holds
  the cache geometry and decoding settings.
* ``text2text``: ``encoder.onnx`` (``input_ids``, ``attention_mask`` ->
  ``last_hidden_state``) and ``decoder.onnx`` (``input_ids``,
  ``encoder_hidden_states``, ``encoder_attention_mask``) -> ``logits``;
  a decoder with a cache also takes ``cross_key_values.{i}.key|value``
  (returned once by the encoder, fed by name) and ``past_key_values.{i}.key|value``
  and returns ``present.{i}.*``; ``generation.decoder_start_token_id``.
* ``anomaly``: ``model.onnx`` taking a float window ``[batch, n_features]``;
  ``anomaly`` names the score output, the threshold and its direction.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator

MANIFEST_SCHEMA: Literal[1] = 1
#: Default chunk size for delivery: small enough for stock broker limits, large enough to be efficient.
DEFAULT_CHUNK_SIZE = 256 * 1024

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
_REL_PART = re.compile(r"^[A-Za-z0-9._+@=-]+$")


def _check_rel_path(value: str) -> str:
    """Relative, forward slashes, no empty, '.' or '..' segments: a path that stays inside the bundle."""
    parts = value.split("/")
    if value.startswith("/") or any(p in ("", ".", "..") or not _REL_PART.match(p) for p in parts):
        raise ValueError(f"{value!r} is not a safe relative path inside a bundle")
    return value


RelPath = Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(_check_rel_path)]


def _unset(value: Any) -> bool:
    return value is None or value == [] or value == {} or value is False


def later(default: Any = None, **kwargs: Any) -> Any:
    """A field added after schema 1 shipped: left out of the signed JSON while it holds its default.

    A manifest that does not use the field is then byte for byte what an older agent verifies and accepts
    (manifests forbid unknown keys); one that uses it needs an agent that knows it, and only such an agent
    can run it anyway.
    """
    return Field(default, exclude_if=_unset, **kwargs)


def _ids(value: Any) -> Any:
    """Token ids as Hugging Face writes them: ``0`` means ``[0]``."""
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


TokenIds = Annotated[list[int], BeforeValidator(_ids)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class Task(StrEnum):
    TEXT_CLASSIFICATION = "text-classification"
    EMBEDDINGS = "embeddings"
    TEXT_GENERATION = "text-generation"
    TEXT2TEXT = "text2text"
    ANOMALY = "anomaly"


class Runtime(StrEnum):
    ONNXRUNTIME = "onnxruntime"
    ONNXRUNTIME_GENAI = "onnxruntime-genai"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class TensorInfo(_Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    dtype: Annotated[str, StringConstraints(max_length=32)]
    shape: list[int | str | None]


class IO(_Strict):
    """The graph's (main graph's, for multi-graph bundles) inputs and outputs."""

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


class FileEntry(_Strict):
    path: RelPath
    sha256: Sha256
    size: Annotated[int, Field(ge=0)]


class ChunkRef(_Strict):
    """One delivery chunk: bytes ``[offset, offset+size)`` of ``files[file]``.

    Chunks never span files and start at multiples of ``chunk_size``, so a file
    that did not change between versions has the same chunks (and hashes), and a
    device that holds them already does not fetch them again.
    """

    index: Annotated[int, Field(ge=0)]
    file: Annotated[int, Field(ge=0)]
    offset: Annotated[int, Field(ge=0)]
    size: Annotated[int, Field(ge=1)]
    sha256: Sha256


def file_chunks(file: int, size: int, chunk_hashes: list[str], chunk_size: int, first_index: int) -> list[ChunkRef]:
    """The chunks of ``files[file]`` (``size`` bytes), numbered from ``first_index``, given each chunk's sha256."""
    if len(chunk_hashes) != -(-size // chunk_size):
        raise ValueError(f"{len(chunk_hashes)} chunk hashes for {size} bytes in chunks of {chunk_size}")
    return [
        ChunkRef(
            index=first_index + i,
            file=file,
            offset=i * chunk_size,
            size=min(chunk_size, size - i * chunk_size),
            sha256=sha,
        )
        for i, sha in enumerate(chunk_hashes)
    ]


def describe_files(files: dict[str, bytes], chunk_size: int) -> tuple[list[FileEntry], list[ChunkRef]]:
    """File entries and the chunk list of in-memory files (paths relative to the bundle), in the given order."""
    entries: list[FileEntry] = []
    chunks: list[ChunkRef] = []
    for index, (path, data) in enumerate(files.items()):
        entries.append(FileEntry(path=path, sha256=hashlib.sha256(data).hexdigest(), size=len(data)))
        hashes = [hashlib.sha256(data[o : o + chunk_size]).hexdigest() for o in range(0, len(data), chunk_size)]
        chunks += file_chunks(index, len(data), hashes, chunk_size, len(chunks))
    return entries, chunks


class Preprocess(_Strict):
    tokenizer: RelPath | None = None
    max_length: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    pooling: Literal["none", "mean", "cls", "max", "lasttoken"] = "none"
    lowercase: bool = False


class Postprocess(_Strict):
    labels: list[Annotated[str, StringConstraints(max_length=128)]] = []
    normalize: bool = False
    softmax: bool = True
    zero_shot_labels: dict[
        Annotated[str, StringConstraints(max_length=128)], Annotated[str, StringConstraints(max_length=1024)]
    ] = {}


class Generation(_Strict):
    max_new_tokens: Annotated[int, Field(ge=1, le=100_000)] = 64
    eos_token_id: TokenIds = []
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    num_layers: Annotated[int, Field(ge=0)] = 0
    num_kv_heads: Annotated[int, Field(ge=0)] = 0
    head_dim: Annotated[int, Field(ge=0)] = 0
    do_sample: bool = False
    temperature: Annotated[float, Field(gt=0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    decoder: RelPath | None = None
    encoder: RelPath | None = None
    #: the graph run for every step after the first when the decoder comes in two files (optimum's
    #: decoder_model.onnx for the prompt, decoder_with_past_model.onnx with the cache)
    decoder_with_past: RelPath | None = later()


class Anomaly(_Strict):
    input: str
    output: str
    n_features: Annotated[int, Field(ge=1)]
    threshold: float
    higher_is_anomalous: bool = True
    #: the graph's own decision (skl2onnx's ``label`` / ``output_label``): a window is anomalous when this
    #: output is not ``normal_label``; the score output is then informational
    label_output: str | None = later()
    normal_label: int | str | None = later()
    #: the classes of a classifier's probability output, in its column order (``scores`` per class)
    classes: list[int | str] = later([])


class Quantization(_Strict):
    method: Literal["none", "fp16", "int8-dynamic", "int4-weight-only", "int8-genai", "int4-genai"] = "none"
    per_channel: bool | None = None
    block_size: int | None = None
    tool: str | None = None
    #: the share of the float weights (parameters of initializers) this variant stores quantized
    weight_fraction: Annotated[float, Field(ge=0, le=1)] | None = later()


class Metrics(_Strict):
    """Measured at registration on the registering machine, against the fp32 reference."""

    agreement: Annotated[float, Field(ge=-1, le=1)] | None = None
    agreement_kind: Literal["cosine", "top1", "token", "score-correlation", "exact"] | None = None
    #: generation: the share of generated tokens before the first divergence when both decode freely
    #: (``agreement`` is teacher-forced: each position compared in the same context)
    free_running_agreement: Annotated[float, Field(ge=0, le=1)] | None = later()
    #: classification: correlation of the variant's logits with fp32's over the evaluation set; matching
    #: labels alone can hide a variant whose output no longer depends on its input (it answers the majority
    #: class)
    score_correlation: Annotated[float, Field(ge=-1, le=1)] | None = later()
    eval_samples: Annotated[int, Field(ge=0)] = 0
    latency_ms_p50: Annotated[float, Field(ge=0)] | None = None
    latency_ms_p95: Annotated[float, Field(ge=0)] | None = None
    tokens_per_s: Annotated[float, Field(ge=0)] | None = None
    peak_rss_bytes: Annotated[int, Field(ge=0)] | None = None
    size_bytes: Annotated[int, Field(ge=0)] = 0
    #: the operator's reference check (inputs with outputs expected from their framework): pass or fail,
    #: over how many cases, and the worst difference seen; None when no reference was given
    reference: Literal["pass", "fail"] | None = later()
    reference_cases: Annotated[int, Field(ge=0)] | None = later()
    reference_detail: Annotated[str, StringConstraints(max_length=1024)] | None = later()


class Requirements(_Strict):
    min_ram_bytes: Annotated[int, Field(ge=0)] = 0
    min_disk_bytes: Annotated[int, Field(ge=0)] = 0
    providers: list[str] = ["CPUExecutionProvider"]


class Budget(_Strict):
    """The on-device self-test fails a candidate that exceeds these (0: no limit)."""

    max_latency_ms: Annotated[float, Field(ge=0)] = 0.0
    max_rss_bytes: Annotated[int, Field(ge=0)] = 0


class RunSpec(_Strict):
    """Everything needed to run a bundle (the manifest's run-relevant subset)."""

    task: Task
    runtime: Runtime = Runtime.ONNXRUNTIME
    io: IO
    entrypoint: RelPath = "model.onnx"
    preprocess: Preprocess = Preprocess()
    postprocess: Postprocess = Postprocess()
    generation: Generation | None = None
    anomaly: Anomaly | None = None


RUN_SPEC_FIELDS = tuple(RunSpec.model_fields)


class Manifest(_Strict):
    schema_version: Literal[1] = MANIFEST_SCHEMA
    model: Name
    version: Annotated[int, Field(ge=1)]
    variant: Name
    task: Task
    runtime: Runtime = Runtime.ONNXRUNTIME
    description: Annotated[str, StringConstraints(max_length=4096)] = ""
    io: IO
    entrypoint: RelPath = "model.onnx"
    preprocess: Preprocess = Preprocess()
    postprocess: Postprocess = Postprocess()
    generation: Generation | None = None
    anomaly: Anomaly | None = None
    files: Annotated[list[FileEntry], Field(min_length=1, max_length=10_000)]
    chunk_size: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = DEFAULT_CHUNK_SIZE
    chunks: list[ChunkRef]
    quantization: Quantization = Quantization()
    metrics: Metrics = Metrics()
    requirements: Requirements = Requirements()
    budget: Budget = Budget()
    created_at: Annotated[float, Field(ge=0)]
    expires_at: Annotated[float, Field(ge=0)] | None = None
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("files: a path is listed twice")
        # Count before listing: a forged size (10**30) must not make a list of 10**24 chunks.
        count = sum(-(-entry.size // self.chunk_size) for entry in self.files)
        if len(self.chunks) != count:
            raise ValueError(f"chunks: {len(self.chunks)} listed, {count} expected for these files")
        expected = [
            (file_index, offset, min(self.chunk_size, entry.size - offset))
            for file_index, entry in enumerate(self.files)
            for offset in range(0, entry.size, self.chunk_size)
        ]
        if len(self.chunks) != len(expected):
            raise ValueError(f"chunks: {len(self.chunks)} listed, {len(expected)} expected for these files")
        for i, (c, (file_index, offset, size)) in enumerate(zip(self.chunks, expected, strict=True)):
            if (c.index, c.file, c.offset, c.size) != (i, file_index, offset, size):
                raise ValueError(
                    f"chunks: entry {i} is (index {c.index}, file {c.file}, offset {c.offset}, size {c.size}),"
                    f" expected ({i}, {file_index}, {offset}, {size})"
                )
        if (
            self.runtime == Runtime.ONNXRUNTIME
            and self.entrypoint not in paths
            and self.task
            not in (
                Task.TEXT_GENERATION,
                Task.TEXT2TEXT,
            )
        ):
            raise ValueError(f"entrypoint {self.entrypoint!r} is not among the files")
        if self.task == Task.ANOMALY and self.anomaly is None:
            raise ValueError("an anomaly model needs the 'anomaly' settings (score output, threshold)")
        if self.task in (Task.TEXT_GENERATION, Task.TEXT2TEXT) and self.generation is None:
            raise ValueError(f"a {self.task.value} model needs 'generation' settings")
        if self.preprocess.tokenizer is not None and self.preprocess.tokenizer not in paths:
            raise ValueError(f"preprocess.tokenizer {self.preprocess.tokenizer!r} is not among the files")
        return self

    def run_spec(self) -> RunSpec:
        return RunSpec(**{name: getattr(self, name) for name in RUN_SPEC_FIELDS})

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
        return canonical_json(self.model_dump(mode="json"))

    @cached_property
    def artifact_id(self) -> str:
        """The artifact's content address: sha256 of the canonical manifest (computed once: the manifest is
        frozen, and serializing a long chunk list costs milliseconds)."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class SignedManifest(_Strict):
    """A manifest with the controller's Ed25519 signature over ``manifest.canonical_bytes()``."""

    manifest: Manifest
    signature: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    key_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    algorithm: Literal["ed25519"] = "ed25519"

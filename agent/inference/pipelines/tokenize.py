"""Text to model tensors on the device, with the ``tokenizers`` package only (no transformers, no torch).

A checkpoint's tokenizer.json may carry padding and truncation settings of its own: MiniLM's pads every
input to 128 tokens and truncates at 128. Both are reset here: padding to the longest text of each batch,
so short texts cost short sequences, and the manifest's ``max_length`` (the model's own limit, read from
its configuration at import) as the longest text accepted. A longer text is never cut silently: it is
refused with the limit in the message, unless its record says ``"truncate": true`` (then it is cut to
``max_length`` tokens, as Hugging Face's ``truncation=True`` does, and the result says ``"truncated": true``).
"""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.inference.pipelines.base import PipelineError
from agent.inference.session import InputError
from wire.manifest import RunSpec

log = logging.getLogger(__name__)

#: The tensors a BERT-family graph may take, in the order tokenizers produces them.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_PAD_CANDIDATES = ("[PAD]", "<pad>", "<PAD>", "[pad]")


class TextEncoder:
    """Tokenizes batches of texts into the int64 tensors a graph declares."""

    def __init__(self, path: Path, max_length: int, input_names: list[str], lowercase: bool = False) -> None:
        from tokenizers import Tokenizer

        if not path.is_file():
            raise PipelineError(f"tokenizer file {path} is missing from the bundle")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise PipelineError(f"cannot load tokenizer {path}: {exc}") from exc
        unknown = [name for name in input_names if name not in TEXT_INPUTS]
        if unknown:
            raise PipelineError(f"the graph takes {unknown}, which a tokenizer cannot produce (it makes {TEXT_INPUTS})")
        if "input_ids" not in input_names:
            raise PipelineError(f"the graph takes {input_names} but no input_ids")
        self.input_names = list(input_names)
        self.max_length = max_length
        self.lowercase = lowercase
        pad_id, pad_token = self._pad()
        self.tokenizer.enable_truncation(max_length=max_length)
        # No fixed length: pad to the longest encoding of the batch, whatever tokenizer.json said.
        # Right padding: a sub-batch sliced to its own longest row is then exactly its own encoding.
        self.tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token, pad_type_id=0)

    def _pad(self) -> tuple[int, str]:
        configured = self.tokenizer.padding
        if configured:
            return int(configured["pad_id"]), str(configured["pad_token"])
        for token in _PAD_CANDIDATES:
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id, token
        log.warning("tokenizer has no pad token; padding with id 0 (masked out by attention_mask)")
        return 0, "[PAD]"

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Tensors for ``texts`` (already validated), padded to the longest of them, each cut to max_length."""
        return self.encode_checked([TextRecord(t, True) for t in texts])[0]

    def encode_checked(self, records: list[TextRecord]) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Tensors for ``records`` and, by row, the error of each text over ``max_length`` that did not ask to
        be truncated (its row is computed cut, and its result replaced by the error)."""
        texts = [r.text.lower() if self.lowercase else r.text for r in records]
        encodings = self.tokenizer.encode_batch(texts)
        errors: dict[int, str] = {}
        for row, (record, encoding) in enumerate(zip(records, encodings, strict=True)):
            if encoding.overflowing:
                record.truncated = True
                if not record.truncate:
                    errors[row] = self.too_long(texts[row])
        arrays = {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int64),
        }
        return {name: arrays[name] for name in self.input_names}, errors

    def too_long(self, text: str) -> str:
        self.tokenizer.no_truncation()
        try:
            length = len(self.tokenizer.encode(text).ids)
        finally:
            self.tokenizer.enable_truncation(max_length=self.max_length)
        return (
            f"the text is {length} tokens, over the model's limit of {self.max_length}: shorten it, or send"
            ' "truncate": true to have it cut to the limit'
        )


class TextRecord:
    """A text to encode and whether its sender allows cutting it to the model's limit."""

    __slots__ = ("text", "truncate", "truncated")

    def __init__(self, text: str, truncate: bool) -> None:
        self.text = text
        self.truncate = truncate
        self.truncated = False


def record_truncate(record: dict[str, Any]) -> bool:
    """The record's ``truncate`` flag (false when absent), or InputError when it is not a boolean."""
    value = record.get("truncate", False)
    if not isinstance(value, bool):
        raise InputError(f'"truncate" must be true or false, got {type(value).__name__}')
    return value


def text_record(record: Any) -> TextRecord:
    """A text record (``{"text": str, "truncate"?: bool}``), or InputError saying what is wrong with it."""
    text = record_text(record)
    return TextRecord(text, record_truncate(record))


def text_encoder(spec: RunSpec, root: Path, input_names: list[str]) -> TextEncoder:
    """The ``TextEncoder`` a text pipeline's manifest asks for."""
    if spec.preprocess.tokenizer is None:
        raise PipelineError(f"a {spec.task.value} bundle needs preprocess.tokenizer (a tokenizer.json)")
    return TextEncoder(
        root / spec.preprocess.tokenizer, spec.preprocess.max_length, input_names, spec.preprocess.lowercase
    )


def record_text(record: Any, key: str = "text") -> str:
    """The text of a record, or InputError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise InputError(f"a record must be a JSON object with a {key!r} string, got {type(record).__name__}")
    if key not in record:
        raise InputError(f"the record has no {key!r} field")
    text = record[key]
    if not isinstance(text, str):
        raise InputError(f"{key!r} must be a string, got {type(text).__name__}")
    return text


def record_values(record: Any, n_features: int, key: str = "values") -> list[float]:
    """The finite numbers of a record's window, or InputError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise InputError(f"a record must be a JSON object with a {key!r} list, got {type(record).__name__}")
    values = record.get(key)
    if not isinstance(values, list | tuple):
        raise InputError(f"{key!r} must be a list of {n_features} numbers")
    if len(values) != n_features:
        raise InputError(f"{key!r} has {len(values)} values, the model takes windows of {n_features}")
    out = []
    for v in values:
        # bool is an int subclass; a sensor reading of True is a bug upstream, not 1.0.
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise InputError(f"{key!r} must hold numbers only, got {type(v).__name__}")
        if not math.isfinite(v):
            raise InputError(f"{key!r} holds a non-finite value ({v})")
        out.append(float(v))
    return out


def run_batched(
    records: list[Any],
    parse: Callable[[Any], Any],
    infer: Callable[[list[Any]], list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Validate every record with ``parse``, run ``infer`` on the valid ones, keep the order.

    A single record that does not parse raises InputError (the caller sent one bad thing); in a batch it
    becomes ``{"error": ...}`` in its place so one bad record cannot fail the others.
    """
    parsed: list[Any] = []
    valid: list[int] = []
    results: list[dict[str, Any]] = [{} for _ in records]
    for i, record in enumerate(records):
        try:
            parsed.append(parse(record))
            valid.append(i)
        except InputError as exc:
            if len(records) == 1:
                raise
            results[i] = {"error": str(exc)}
    if parsed:
        for i, result in zip(valid, infer(parsed), strict=True):
            results[i] = result
    return results


def length_batches(feeds: dict[str, np.ndarray], max_batch: int) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Split a padded batch into sub-batches of similar length, each padded only to its own longest row.

    Returns ``(row indices, feeds)`` pairs. Sorting by length keeps a few long texts from making every
    short one pay for their padding.
    """
    lengths = feeds["attention_mask"].sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, len(order), max_batch):
        rows = order[start : start + max_batch]
        width = max(int(lengths[rows].max()), 1)
        batches.append((rows, {name: np.ascontiguousarray(a[rows, :width]) for name, a in feeds.items()}))
    return batches


def rows_interact(model_path: Path) -> bool:
    """True when a row's result depends on the other rows of its batch.

    Dynamic int8 graphs (``DynamicQuantizeLinear``) pick one activation scale per tensor, over every row
    of the batch and its padding: batched, a text's embedding moves by ~0.02 per component with its
    neighbours (measured on MiniLM). Pipelines run such graphs one row at a time so a result never depends
    on what else was queued; that costs ~1.5x throughput and int8 stays faster than batched fp32.
    The op name sits in the graph file as plain bytes; external weight files need not be read.
    """
    try:
        with model_path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b"DynamicQuantizeLinear") >= 0
    except (OSError, ValueError):
        return False

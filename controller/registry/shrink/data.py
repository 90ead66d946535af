"""Reading the operator's data files and splitting them deterministically (no torch here)."""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, TypeVar

from controller.registry.shrink import ShrinkError

T = TypeVar("T")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _lines(path: Path, limit: int) -> list[tuple[int, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"data file {path} does not exist: give a JSON-lines file")
    rows: list[tuple[int, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if len(rows) >= limit:
                break
            try:
                rows.append((number, json.loads(line)))
            except ValueError as exc:
                raise ShrinkError(
                    f"{path.name} line {number} is not JSON ({exc}): write one JSON value per line"
                ) from None
    return rows


def read_texts(path: Path, limit: int = 200_000) -> tuple[list[str], str]:
    """JSON lines of ``{"text": ...}`` or a JSON string per line -> (texts, sha256 of the file)."""
    texts = []
    for number, value in _lines(path, limit):
        text = value.get("text") if isinstance(value, dict) else value
        if not isinstance(text, str):
            raise ShrinkError(f'{Path(path).name} line {number}: expected a string or {{"text": ...}}')
        if text.strip():
            texts.append(text)
    if not texts:
        raise ShrinkError(f'{Path(path).name} holds no texts: one JSON string or {{"text": ...}} per line')
    return texts, sha256_file(path)


def read_labeled(path: Path, limit: int = 200_000) -> tuple[list[tuple[str, str]], str]:
    """JSON lines of ``{"text": ..., "label": ...}`` -> (examples, sha256 of the file)."""
    examples = []
    for number, value in _lines(path, limit):
        if not isinstance(value, dict) or not isinstance(value.get("text"), str) or "label" not in value:
            raise ShrinkError(f'{Path(path).name} line {number}: expected {{"text": "...", "label": "..."}}')
        label = value["label"]
        if not isinstance(label, str | int) or isinstance(label, bool):
            raise ShrinkError(f"{Path(path).name} line {number}: a label is a string (or an int), not {label!r}")
        examples.append((value["text"], str(label)))
    if not examples:
        raise ShrinkError(f'{Path(path).name} holds no examples: one {{"text": ..., "label": ...}} per line')
    return examples, sha256_file(path)


def check_fraction(name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    if not isinstance(value, int | float) or not (low <= float(value) < high):
        raise ShrinkError(f"{name} must be a fraction in [{low}, {high}), got {value!r}")
    return float(value)


def split(items: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held_out): a seeded shuffle, then the last ``fraction`` held out (at least one item of each
    when there are two or more)."""
    if not items:
        raise ShrinkError("no data: give at least a few texts")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = round(len(items) * fraction)
    if fraction > 0 and len(items) >= 2:
        n_held = min(max(n_held, 1), len(items) - 1)
    held = sorted(order[len(order) - n_held :]) if n_held else []
    held_set = set(held)
    return [items[i] for i in range(len(items)) if i not in held_set], [items[i] for i in held]


def stratified_split(
    examples: list[tuple[str, str]], fraction: float, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held_out) with each label held out in proportion (a label with one example trains only)."""
    by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for example in examples:
        by_label[example[1]].append(example)
    train: list[tuple[str, str]] = []
    held: list[tuple[str, str]] = []
    for i, label in enumerate(sorted(by_label)):
        part_train, part_held = split(by_label[label], fraction, seed + i)
        train += part_train
        held += part_held
    random.Random(seed).shuffle(train)
    return train, held

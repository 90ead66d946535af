"""Sensor anomaly scoring on the device: numeric windows in, a score and a decision out."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.inference.pipelines.base import PipelineError
from agent.inference.pipelines.tokenize import record_values, run_batched
from agent.inference.session import InputError, load_session
from wire.manifest import RunSpec

log = logging.getLogger(__name__)

_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


class AnomalyPipeline:
    """``{"values": [float] * n_features}`` -> ``{"score": float, "anomaly": bool}`` (+ ``label``).

    The score output may come back as ``[batch]``, ``[batch, 1]`` or flattened (skl2onnx's converters
    differ); anything that is not one number per window is refused.

    With ``anomaly.label_output`` the graph decides (skl2onnx's outlier detectors answer 1 or -1, its
    classifiers a class): a window is anomalous when its label is not ``normal_label``, and the result
    carries the label. A classifier's probability output (``[batch, classes]``, or the list of
    ``{class: p}`` maps skl2onnx's ZipMap returns) gives ``scores`` per class and ``score`` = 1 - P(normal).
    """

    def __init__(self, spec: RunSpec, root: Path, threads: int = 0) -> None:
        if spec.anomaly is None:
            raise PipelineError("an anomaly bundle needs the 'anomaly' settings (input, output, threshold)")
        self.spec = spec
        self.settings = spec.anomaly
        self.root = Path(root)
        self.session = load_session(self.root / spec.entrypoint, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if self.settings.input not in inputs:
            raise PipelineError(f"the manifest names input {self.settings.input!r}, the graph takes {sorted(inputs)}")
        if self.settings.output not in outputs:
            raise PipelineError(f"the manifest names output {self.settings.output!r}, the graph has {outputs}")
        declared = inputs[self.settings.input]
        self.dtype = _FLOAT_TYPES.get(declared.type)
        if self.dtype is None:
            raise PipelineError(f"input {declared.name!r} is {declared.type}; an anomaly model takes float windows")
        width = declared.shape[-1] if declared.shape else None
        if isinstance(width, int) and width != self.settings.n_features:
            raise PipelineError(f"the graph takes windows of {width}, the manifest says {self.settings.n_features}")
        self.label_output = self.settings.label_output
        if self.label_output is not None and self.label_output not in outputs:
            raise PipelineError(f"the manifest names label output {self.label_output!r}, the graph has {outputs}")
        self.fetch = [self.settings.output] + ([self.label_output] if self.label_output else [])
        self.classes = list(self.settings.classes)

    def _parse(self, record: Any) -> list[float]:
        return record_values(record, self.settings.n_features)

    def scores(self, windows: np.ndarray) -> np.ndarray:
        """One score per window of a ``[batch, n_features]`` array."""
        return self._run(windows)[0]

    def _run(self, windows: np.ndarray) -> tuple[np.ndarray, list[Any] | None, list[dict[str, float]] | None]:
        """(scores, labels or None, class probabilities or None) for a ``[batch, n_features]`` array."""
        outputs = self.session.run(self.fetch, {self.settings.input: windows.astype(self.dtype)})
        n = windows.shape[0]
        labels = None
        if self.label_output is not None:
            labels = [_plain(v) for v in np.asarray(outputs[1]).reshape(-1)]
            if len(labels) != n:
                raise PipelineError(f"label output {self.label_output!r} is not one label per window")
        probabilities = self._class_probabilities(outputs[0], n)
        if probabilities is not None:
            normal = self.settings.normal_label
            flat = np.asarray([1.0 - row.get(str(normal), 0.0) for row in probabilities], dtype=np.float64)
            return flat, labels, probabilities
        flat = np.asarray(outputs[0], dtype=np.float64).reshape(-1)
        if flat.size != n:
            raise PipelineError(
                f"output {self.settings.output!r} has shape {np.shape(outputs[0])}: not one score per window"
            )
        return flat, labels, None

    def _class_probabilities(self, output: Any, n: int) -> list[dict[str, float]] | None:
        """Per-window ``{class: p}`` when the score output is a classifier's probabilities, else None."""
        if isinstance(output, list) and output and isinstance(output[0], dict):
            return [{str(k): float(v) for k, v in row.items()} for row in output]
        if self.classes:
            array = np.asarray(output, dtype=np.float64)
            if array.shape == (n, len(self.classes)):
                return [{str(c): float(p) for c, p in zip(self.classes, row, strict=True)} for row in array]
        return None

    def _infer(self, windows: list[list[float]]) -> list[dict[str, Any]]:
        scores, labels, probabilities = self._run(np.asarray(windows, dtype=np.float64))
        threshold = self.settings.threshold
        higher = self.settings.higher_is_anomalous
        results: list[dict[str, Any]] = []
        for i, s in enumerate(scores):
            if labels is not None:
                result: dict[str, Any] = {
                    "score": float(s),
                    "anomaly": str(labels[i]) != str(self.settings.normal_label),
                    "label": labels[i],
                }
            else:
                result = {"score": float(s), "anomaly": bool(s > threshold if higher else s < threshold)}
            if probabilities is not None:
                result["scores"] = probabilities[i]
            results.append(result)
        return results

    def run(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per record, in order; see ``agent.inference.pipelines`` for the formats."""
        return run_batched(records, self._parse, self._infer)

    def stream(self, record: dict[str, Any]) -> Iterator[str]:
        raise InputError("streaming is for text generation; an anomaly model answers with run()")

    def warmup(self) -> None:
        self.run([{"values": [0.0] * self.settings.n_features}])

    def close(self) -> None:
        self.session = None


def _plain(value: Any) -> Any:
    """A label as JSON has it: numpy ints as int, strings as str."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value

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
from agent.protocol.manifest import RunSpec

log = logging.getLogger(__name__)

_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


class AnomalyPipeline:
    """``{"values": [float] * n_features}`` -> ``{"score": float, "anomaly": bool}``.

    The score output may come back as ``[batch]``, ``[batch, 1]`` or flattened (skl2onnx's converters
    differ); anything that is not one number per window is refused.
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

    def _parse(self, record: Any) -> list[float]:
        return record_values(record, self.settings.n_features)

    def scores(self, windows: np.ndarray) -> np.ndarray:
        """One score per window of a ``[batch, n_features]`` array."""
        output = self.session.run([self.settings.output], {self.settings.input: windows.astype(self.dtype)})[0]
        flat = np.asarray(output, dtype=np.float64).reshape(-1)
        if flat.size != windows.shape[0]:
            raise PipelineError(
                f"output {self.settings.output!r} has shape {np.shape(output)}: not one score per window"
            )
        return flat

    def _infer(self, windows: list[list[float]]) -> list[dict[str, Any]]:
        scores = self.scores(np.asarray(windows, dtype=np.float64))
        threshold = self.settings.threshold
        higher = self.settings.higher_is_anomalous
        return [{"score": float(s), "anomaly": bool(s > threshold if higher else s < threshold)} for s in scores]

    def run(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per record, in order; see ``agent.inference.pipelines`` for the formats."""
        return run_batched(records, self._parse, self._infer)

    def stream(self, record: dict[str, Any]) -> Iterator[str]:
        raise InputError("streaming is for text generation; an anomaly model answers with run()")

    def warmup(self) -> None:
        self.run([{"values": [0.0] * self.settings.n_features}])

    def close(self) -> None:
        self.session = None

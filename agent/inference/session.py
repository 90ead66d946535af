"""Loading an ONNX model into onnxruntime and turning JSON inputs into its tensors.

numpy and onnxruntime are imported inside the functions that need them: an agent that serves no
model yet stays small (idle RSS is a goal of its own, see ``agent.telemetry.system``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.inference import mapped

#: onnxruntime type names to numpy dtype names (resolved with numpy when a model loads).
_ORT_TYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}


class ModelLoadError(Exception):
    """The model file cannot be loaded; the message says why."""


class InputError(ValueError):
    """An input record does not fit the model's inputs."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: Any
    shape: tuple[int | str | None, ...]


#: Whether onnxruntime's worker threads busy-wait for the next run (see ``configure_sessions``).
_ALLOW_SPINNING = False


def configure_sessions(*, allow_spinning: bool) -> None:
    """Process-wide options for every session ``load_session`` creates from now on.

    Spinning (onnxruntime's default) keeps its worker threads busy-waiting between runs: a little
    lower latency for back-to-back runs of a bare loop, but in the agent, where tokenizing, results and
    the network run between two inferences, the spinning threads take the cores those need (on a
    2-core machine the agent's overhead over bare session.run fell from ~15-25% to ~0 without it),
    and an idle device burns power. So the agent turns it off unless told otherwise.
    """
    global _ALLOW_SPINNING
    _ALLOW_SPINNING = allow_spinning


def load_session(path: str | os.PathLike[str], threads: int = 0) -> Any:
    """An onnxruntime InferenceSession on the CPU; ``threads`` 0 lets onnxruntime decide."""
    import onnxruntime as ort  # heavy import, only where a model runs

    options = ort.SessionOptions()
    spin = "1" if _ALLOW_SPINNING else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    data = mapped.data_files(Path(path))
    mapped.evict(data)  # its rows come back one page at a time (agent.inference.mapped)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {path}: {exc}") from exc
    mapped.read_randomly(data)
    return session


class TensorModel:
    """A model fed with named tensors, e.g. ``{"x": [[0.1, 0.2]]}``."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 0) -> None:
        import numpy as np

        self._np = np
        self.path = str(path)
        self.session = load_session(path, threads)
        self.inputs = [
            TensorSpec(i.name, np.dtype(_ORT_TYPES.get(i.type, "float32")), tuple(i.shape))
            for i in self.session.get_inputs()
        ]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def feeds(self, record: Any) -> dict[str, Any]:
        """Tensors for one JSON record: either ``{"inputs": {...}}`` or the mapping itself."""
        np = self._np
        if isinstance(record, dict) and isinstance(record.get("inputs"), dict):
            record = record["inputs"]
        if not isinstance(record, dict):
            raise InputError("an input record must be a JSON object mapping input names to arrays")
        feeds: dict[str, Any] = {}
        for spec in self.inputs:
            if spec.name not in record:
                raise InputError(f"input {spec.name!r} is missing (the model takes {[s.name for s in self.inputs]})")
            try:
                array = np.asarray(record[spec.name], dtype=spec.dtype)
            except (TypeError, ValueError) as exc:
                raise InputError(f"input {spec.name!r}: {exc}") from None
            if len(spec.shape) and array.ndim != len(spec.shape):
                raise InputError(
                    f"input {spec.name!r} has {array.ndim} dimensions, the model expects {len(spec.shape)}"
                )
            feeds[spec.name] = array
        return feeds

    def run(self, feeds: dict[str, Any]) -> list[Any]:
        return list(self.session.run(None, feeds))

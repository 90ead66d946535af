"""What ``--model`` points at: a bare ``.onnx`` graph or a bundle directory, and how to serve it.

A bundle directory holds its files and one description of how to run them:

* ``manifest.json``: a ``Manifest`` or a ``SignedManifest`` (what the registry delivers). The model
  name, version and variant become the ``ModelRef`` reported in telemetry. A signature is not
  verified here: a bundle given on the command line is the operator's choice; deployments verify
  against the pinned key before anything is installed.
* ``slmfleet.json``: a bare ``RunSpec`` (what an export writes): servable, but anonymous.

A bare ``.onnx`` file is served in raw-tensor mode (``agent.inference.tensor``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from agent.inference.session import ModelLoadError
from wire.manifest import Manifest, RunSpec, SignedManifest
from wire.messages import ModelRef

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
RUN_SPEC_FILE = "slmfleet.json"


@dataclass(frozen=True)
class ModelSource:
    """A model ready to load: where its files are and how to run them (``spec`` None: raw tensors)."""

    path: Path
    spec: RunSpec | None
    ref: ModelRef | None = None
    artifact_id: str = ""
    manifest: Manifest | None = None

    @property
    def bundle_dir(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def graph_files(self) -> list[Path]:
        """The ONNX graphs and their external data: what onnxruntime holds in memory."""
        if self.spec is None:
            data = [p for p in self.bundle_dir.iterdir() if p.name.startswith(self.path.name + ".")]
            return [self.path, *data]
        return sorted(
            p
            for p in self.bundle_dir.rglob("*")
            if p.is_file() and (p.suffix in (".onnx", ".data", ".onnx_data") or p.name.endswith(".onnx.data"))
        )

    def describe(self) -> str:
        if self.ref is not None:
            return f"{self.ref.model} v{self.ref.version} ({self.ref.variant})"
        return str(self.path)


def resolve_model(path: Path) -> ModelSource:
    """Describe the model at ``path``; ModelLoadError says what is wrong and what to give instead."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".onnx":
            raise ModelLoadError(f"{path} is not an .onnx graph; give an .onnx file or a bundle directory")
        return ModelSource(path=path, spec=None)
    if not path.is_dir():
        raise ModelLoadError(f"model {path} does not exist")
    manifest_path = path / MANIFEST_FILE
    if manifest_path.is_file():
        manifest, artifact_id = _read_manifest(manifest_path)
        missing = [f.path for f in manifest.files if not (path / f.path).is_file()]
        if missing:
            raise ModelLoadError(f"bundle {path} lacks files its manifest lists: {', '.join(missing[:5])}")
        wrong = [f.path for f in manifest.files if (path / f.path).stat().st_size != f.size]
        if wrong:
            raise ModelLoadError(f"bundle {path}: files differ in size from the manifest: {', '.join(wrong[:5])}")
        ref = ModelRef(model=manifest.model, version=manifest.version, variant=manifest.variant)
        return ModelSource(path, manifest.run_spec(), ref, artifact_id, manifest)
    spec_path = path / RUN_SPEC_FILE
    if spec_path.is_file():
        try:
            spec = RunSpec.model_validate_json(spec_path.read_bytes())
        except ValidationError as exc:
            raise ModelLoadError(f"{spec_path} is not a valid run spec: {_first_error(exc)}") from None
        return ModelSource(path, spec)
    raise ModelLoadError(
        f"{path} is a directory without {MANIFEST_FILE} or {RUN_SPEC_FILE}: give a bundle directory, "
        "or the .onnx file itself to serve raw tensors"
    )


def _read_manifest(path: Path) -> tuple[Manifest, str]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    try:
        if isinstance(data, dict) and "manifest" in data and "signature" in data:
            signed = SignedManifest.model_validate(data)
            return signed.manifest, signed.manifest.artifact_id
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ModelLoadError(f"{path} is not a valid manifest: {_first_error(exc)}") from None
    return manifest, manifest.artifact_id


def _first_error(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "document"
    return f"{where}: {first['msg']}"

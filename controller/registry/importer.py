"""Turning an upload into a registered version: unpack, check, (export,) quantize, evaluate, sign, store.

The database changes happen in one transaction at the very end, after every
file is in the content store: a crash at any earlier point leaves no version
behind (only unreferenced blobs, which the next start-up removes).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from controller.db.models import Artifact, Model, ModelVersion
from controller.registry import sources
from controller.registry.bundles import (
    HINTS_FILE,
    QUANTIZATION_OF,
    BundleError,
    ImportOptions,
    default_variants,
    detect_source,
    merge_hints,
)
from controller.registry.convert import ConversionError, ExportedBundle
from controller.registry.keys import SigningKey
from controller.registry.store import ArtifactStore
from controller.registry.upload import UnpackLimits, is_archive, unpack
from wire import signing
from wire.manifest import (
    Budget,
    ChunkRef,
    FileEntry,
    Manifest,
    Metrics,
    Requirements,
    SignedManifest,
    Task,
    file_chunks,
)

log = logging.getLogger(__name__)

Progress = Callable[[str, float, str], None]

#: Default agreement floors (a variant below one is refused), by measure, or by ``measure:variant`` where a
#: quantization method is expected to agree less. Operators who need a quality bar set ``min_agreement``
#: (settings, per measure or measure:variant) or ``options.min_agreement`` (per import, the agreement's floor).
#:
#: Set from ``python -m benchmarks floors`` (the README's Agreement floors has the table): the registry's own
#: evaluation of working variants (int8 and int4 of all-MiniLM-L6-v2's real weights, of a classifier and a
#: GPT-2 trained there, of the exporters' fixtures and the seed families) against broken ones (weights
#: scrambled or drawn at random, embedding tables zeroed, int4 of the trained models with outlier weights):
#:
#: * cosine: working 0.970 (MiniLM int4) and up; broken 0.21 at most; 2-bit MiniLM 0.64 and outlier-hit
#:   int8 0.75 are refused too.
#: * top1: working int8 0.954 and up (the trained classifier's int4 0.996); random-weight seeds' int4 flips
#:   labels on their near-flat logits (0.50 to 0.65) and is refused. Labels cannot tell a collapsed variant
#:   (broken ones measured up to 1.0 when fp32 answers one class for the evaluation texts), hence:
#: * score-correlation (a classifier's logits against fp32's): working 0.449 (the tiny optimum fixture,
#:   whose logits barely move) and 0.947 and up otherwise; broken 0.206 at most, collapsed ones 0.0 to 0.11.
#: * token (teacher-forced): working int8 0.878 (GPT-Neo 125M) and up, int4 0.388 (GPT-Neo) and up; broken
#:   0.194 at most (a trained GPT-2 with its embeddings zeroed still predicts its commonest tokens), except
#:   against a reference that answers the same for every input (the random T5 fixture repeats one token),
#:   which a collapsed variant matches (0.67): no comparison of outputs tells those apart.
#: * exact (anomaly decisions): working 0.9925; broken 0.70 at most (a broken detector still calls most
#:   windows normal).
DEFAULT_FLOORS = {
    "cosine": 0.9,
    "top1": 0.9,
    "score-correlation": 0.3,
    "token": 0.5,
    "token:int4": 0.3,
    "exact": 0.9,
}


class MissingDependency(ConversionError):
    """A variant cannot be built because a package is missing on the controller (an install problem)."""


#: what each kind of agreement measures, as the refusal says it
_MEASURED = {
    "token": "token agreement with fp32 (the share of fp32's next tokens it picks, fed fp32's text)",
    "top1": "top-1 agreement with fp32 (the share of texts given fp32's label)",
    "cosine": "the mean cosine of its embeddings to fp32's",
    "exact": "the share of windows it decides as fp32 does",
}


def floor_for(floors: dict[str, float], kind: str, variant: str) -> float | None:
    """``floors``' value for agreement ``kind`` of ``variant``: ``kind:variant`` first, then ``kind``."""
    for key in (f"{kind}:{variant}", kind):
        if key in floors:
            return floors[key]
    return None


@dataclass
class ImportRequest:
    job_id: str
    model_name: str
    bundle_root: Path
    options: ImportOptions
    actor: str
    #: a derive job's step: how the version was made (``ModelVersion.lineage``), the job and the step's index
    lineage: dict[str, Any] | None = None
    derive_job_id: str | None = None
    derive_step: int | None = None


@dataclass
class ImportResult:
    version: int
    variants: list[str]
    refused: list[dict[str, Any]]
    #: what the import read from the model's files (layout, task, limits, ids), for the operator
    notes: list[str] | None = None


class Importer:
    def __init__(
        self,
        engine: Engine,
        store: ArtifactStore,
        key: SigningKey,
        *,
        chunk_size: int,
        validity_days: float,
        max_unpacked_bytes: int,
        floors: dict[str, float] | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.key = key
        self.chunk_size = chunk_size
        self.validity_days = validity_days
        self.max_unpacked_bytes = max_unpacked_bytes
        #: the operator's floors (settings), consulted before the defaults
        self.floors = dict(floors or {})

    # ----------------------------------------------------------------- run --

    def run(self, req: ImportRequest, progress: Progress, work: Path) -> ImportResult:
        root = req.bundle_root
        options = merge_hints(root, req.options)
        source = detect_source(root)
        options = options.model_copy(update={"task": self._task_for(req.model_name, options, root, source)})
        progress("checking", 0.05, f"{source} bundle" + (f" for {options.task.value}" if options.task else ""))
        notes: list[str] = []
        reference = self._reference(root, source, options, work, progress, notes)
        task = reference.spec.task
        options = options.model_copy(update={"task": task})
        if notes:
            progress("checking", 0.2, "; ".join(notes)[:1000])
        if options.reference:
            from controller.registry.reference import check_keys

            check_keys(task, options.reference)
        wanted = [v for v in (options.variants or default_variants(task)) if v != "fp32"]
        samples = options.eval_set
        progress("measuring fp32", 0.3, "")
        # fp32 is the reference the variants are measured against: against itself it would agree 1.0 and
        # check nothing, so its agreement stays empty and only the operator's reference (if any) checks it
        unmeasured = dict.fromkeys(("agreement", "agreement_kind", "score_correlation", "free_running_agreement"))
        fp32_metrics = self._evaluate(reference, reference, samples).model_copy(update=unmeasured)
        fp32_metrics = self._check_reference(reference, options, fp32_metrics, "fp32")
        built: list[tuple[str, ExportedBundle, Metrics]] = [("fp32", reference, fp32_metrics)]
        refused: list[dict[str, Any]] = []
        step = 0.55 / max(len(wanted), 1)
        for i, variant in enumerate(wanted):
            base = 0.35 + i * step
            progress(f"quantizing {variant}", base, "")
            try:
                candidate = self._quantize(reference, variant, work / variant)
            except MissingDependency as exc:
                # not a verdict on the model: this controller cannot build what was asked (or what the task
                # needs by default), so the import fails instead of quietly registering fewer variants
                raise BundleError(f"{variant}: {exc}") from None
            except ConversionError as exc:
                refused.append({"variant": variant, "reason": f"quantization failed: {exc}"})
                if options.strict:
                    raise BundleError(f"{variant}: quantization failed: {exc}") from None
                continue
            if _same_graphs(reference, candidate):
                refused.append(
                    {
                        "variant": variant,
                        "reason": f"{variant} would be identical to fp32: the graph has"
                        " no weights this quantization applies to",
                    }
                )
                continue
            progress(f"evaluating {variant}", base + step / 2, "")
            metrics = self._evaluate(reference, candidate, samples)
            reason = self.refusal(metrics, variant, options.min_agreement)
            if reason is not None:
                refused.append({"variant": variant, "reason": reason, "agreement": metrics.agreement})
                if options.strict:
                    raise BundleError(f"{variant} refused: {reason}")
                continue
            metrics = self._check_reference(candidate, options, metrics, variant)
            built.append((variant, candidate, metrics))
        progress("signing and storing", 0.92, "")
        result = self._register(req, task, source, options, built, refused, work)
        result.notes = notes
        return result

    def _check_reference(
        self, bundle: ExportedBundle, options: ImportOptions, metrics: Metrics, variant: str
    ) -> Metrics:
        """The operator's reference check on ``bundle``: fp32 must pass; the others' decisions are recorded."""
        decisions_only = variant != "fp32"
        if not options.reference:
            return metrics
        from controller.registry.reference import run_reference

        result = run_reference(
            bundle,
            options.reference,
            options.reference_tolerance,
            decisions_only=decisions_only,
            cosine=self.floor("cosine", variant),
        )
        if not result.passed and not decisions_only:
            raise BundleError(
                f"fp32 does not reproduce the reference outputs: {result.detail}. The model's files were read"
                " differently from how its framework runs it: check the task, tokenizer, pooling, labels or"
                " anomaly options, or the tolerance (reference_tolerance)"
            )
        return metrics.model_copy(
            update={"reference": result.status, "reference_cases": result.cases, "reference_detail": result.detail}
        )

    def refusal(self, metrics: Metrics, variant: str, min_agreement: float | None = None) -> str | None:
        """Why ``variant`` is refused (measured against fp32, its output is not that model's any more), or None.

        ``min_agreement`` (the import's option) replaces the floor of the agreement itself; the scores'
        correlation keeps the registry's floor.
        """
        if metrics.agreement is None:
            return "agreement with fp32 not measured"
        kind = metrics.agreement_kind or ""
        floor = min_agreement if min_agreement is not None else self.floor(kind, variant)
        if metrics.agreement < floor:
            return (
                f"{_MEASURED.get(kind, f'{kind} agreement with fp32')} is {metrics.agreement:.4f}, below the floor"
                f" of {floor:.4f}: its output is not fp32's (set min_agreement to keep it anyway)"
            )
        if metrics.score_correlation is not None:
            floor = self.floor("score-correlation", variant)
            if metrics.score_correlation < floor:
                return (
                    f"its scores follow fp32's with a correlation of {metrics.score_correlation:.4f} over the"
                    f" evaluation set, below the floor of {floor:.4f}: its answers hardly depend on the input"
                    f" although {metrics.agreement:.4f} of its decisions match"
                )
        return None

    def floor(self, kind: str, variant: str) -> float:
        """The agreement floor of ``variant`` for agreement ``kind``.

        The operator's floors come first, then the defaults; within each, ``kind:variant`` beats ``kind``.
        So an operator's ``{"token": 0.6}`` applies to int4 too, although the defaults set int4 apart.
        """
        for floors in (self.floors, DEFAULT_FLOORS):
            found = floor_for(floors, kind, variant)
            if found is not None:
                return found
        return 0.0

    # ------------------------------------------------------------- stages --

    def bundle_root(self, upload_root: Path, files: list[str], work: Path) -> Path:
        """The directory holding the bundle: an uploaded archive unpacked, or the uploaded files themselves."""
        if len(files) == 1 and is_archive(upload_root / files[0]):
            return unpack(upload_root / files[0], work / "unpacked", UnpackLimits(self.max_unpacked_bytes))
        if len(files) == 1 and files[0].endswith(".onnx") and files[0] != "model.onnx":
            # a lone ONNX file is the bundle's model.onnx, whatever it was called
            target = work / "single" / "model.onnx"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(upload_root / files[0], target)
            return target.parent
        return upload_root

    def _task_for(self, name: str, options: ImportOptions, root: Path, source: str) -> Task | None:
        """The task: the model's (when it exists), else the options', else what a checkpoint's config.json
        says; None leaves it to the bundle's files (``layouts.detect_task``)."""
        with Session(self.engine) as session:
            model = session.exec(select(Model).where(Model.name == name)).first()
        if model is None:
            if options.task is None and source == "hf":
                from controller.registry.hfconfig import ConfigError, read_model_config, task_from_architectures

                try:
                    found = task_from_architectures(read_model_config(root))
                except ConfigError as exc:
                    raise BundleError(str(exc)) from None
                if found is None:
                    raise BundleError(
                        "config.json's architectures do not say which task the checkpoint performs: give"
                        " options.task (text-classification, embeddings, text-generation or text2text)"
                    )
                return Task(found[0])
            return options.task
        if options.task is not None and options.task.value != model.task:
            raise BundleError(f"model {name!r} is a {model.task} model; this upload says {options.task.value}")
        return Task(model.task)

    def _reference(
        self, root: Path, source: str, options: ImportOptions, work: Path, progress: Progress, notes: list[str]
    ) -> ExportedBundle:
        if source in ("onnx", "genai"):
            from controller.registry.layouts import inspect_bundle

            inspection = inspect_bundle(root, options)
            notes += inspection.notes
            return inspection.bundle
        assert options.task is not None
        progress("exporting to ONNX", 0.1, "Hugging Face checkpoint")
        try:
            from controller.registry.convert import export_hf
        except ImportError as exc:  # pragma: no cover - the module itself is light
            raise BundleError(f"conversion is unavailable: {exc}") from None
        export_options: dict[str, Any] = {}
        if options.task == Task.TEXT_GENERATION:
            export_options["runtime"] = options.runtime
        try:
            bundle = export_hf(root, options.task, work / "fp32", **export_options)
        except ModuleNotFoundError as exc:
            raise BundleError(
                f"importing a Hugging Face checkpoint needs the convert extra on the controller ({exc.name} is"
                " missing): pip install 'slmfleet[convert]', or export to ONNX yourself and upload the bundle"
            ) from None
        except ConversionError as exc:
            raise BundleError(str(exc)) from None
        return self._apply_overrides(bundle, options)

    @staticmethod
    def _apply_overrides(bundle: ExportedBundle, options: ImportOptions) -> ExportedBundle:
        spec = bundle.spec
        if options.labels:
            post = spec.postprocess.model_copy(update={"labels": options.labels})
            spec = spec.model_copy(update={"postprocess": post})
        if options.zero_shot_labels:
            post = spec.postprocess.model_copy(update={"zero_shot_labels": options.zero_shot_labels})
            spec = spec.model_copy(update={"postprocess": post})
        if options.max_length:
            pre = spec.preprocess.model_copy(update={"max_length": options.max_length})
            spec = spec.model_copy(update={"preprocess": pre})
        if options.generation and spec.generation is not None:
            given = options.generation.model_dump(exclude_unset=True)
            if given:
                merged = spec.generation.model_dump() | given
                spec = spec.model_copy(update={"generation": type(spec.generation).model_validate(merged)})
        bundle.spec = spec
        return bundle

    def _quantize(self, reference: ExportedBundle, variant: str, out: Path) -> ExportedBundle:
        from controller.registry.convert import quantize

        try:
            return quantize(reference, QUANTIZATION_OF[variant], out)
        except ModuleNotFoundError as exc:
            raise MissingDependency(
                f"quantization needs the Python package {exc.name!r}, which is not installed on the controller:"
                " reinstall it with pip install 'slmfleet[controller]', or ask only for the variants it can build"
                ' (options {"variants": ["fp32"]})'
            ) from None

    @staticmethod
    def _evaluate(
        reference: ExportedBundle, candidate: ExportedBundle, samples: list[dict[str, Any]] | None
    ) -> Metrics:
        from controller.registry.convert import evaluate

        try:
            return evaluate(reference, candidate, samples)
        except ConversionError as exc:
            raise BundleError(f"the model does not run: {exc}") from None
        except ModuleNotFoundError as exc:
            raise BundleError(f"evaluation needs {exc.name}, which is not installed") from None

    # ----------------------------------------------------------- register --

    def _store(self, bundle: ExportedBundle) -> tuple[list[FileEntry], list[ChunkRef]]:
        """Put the bundle's files in the artifact store: their entries and chunks for the manifest. Done before the
        version's transaction opens: a database store writes in a transaction of its own (on SQLite it would wait
        for the version's write lock), and no artifact row ever names a blob that is not stored yet."""
        files: list[FileEntry] = []
        chunks: list[ChunkRef] = []
        for rel in bundle.files():
            posix = rel.as_posix()
            if posix == HINTS_FILE or any(part.startswith(".") for part in rel.parts):
                continue
            sha, size, chunk_hashes = self.store.put_file_chunked(bundle.root / rel, self.chunk_size)
            chunks += file_chunks(len(files), size, chunk_hashes, self.chunk_size, len(chunks))
            files.append(FileEntry(path=posix, sha256=sha, size=size))
        return files, chunks

    def _manifest(
        self,
        name: str,
        number: int,
        variant: str,
        bundle: ExportedBundle,
        metrics: Metrics,
        options: ImportOptions,
        stored: tuple[list[FileEntry], list[ChunkRef]],
    ) -> Manifest:
        files, chunks = stored
        size_bytes = sum(f.size for f in files)
        metrics = metrics.model_copy(update={"size_bytes": size_bytes})
        min_ram = int((metrics.peak_rss_bytes or size_bytes * 2) * 1.25)
        now = time.time()
        days = options.expires_in_days or self.validity_days
        spec = bundle.spec
        return Manifest(
            model=name,
            version=number,
            variant=variant,
            description=options.description,
            files=files,
            chunk_size=self.chunk_size,
            chunks=chunks,
            quantization=bundle.quantization,
            metrics=metrics,
            requirements=Requirements(min_ram_bytes=min_ram, min_disk_bytes=size_bytes * 2),
            budget=options.budget or Budget(),
            created_at=now,
            expires_at=now + days * 86400,
            extra={k: v for k, v in bundle.extra.items() if isinstance(v, str | int | float | bool)},
            **spec.model_dump(),
        )

    def _register(
        self,
        req: ImportRequest,
        task: Task,
        source: str,
        options: ImportOptions,
        built: list[tuple[str, ExportedBundle, Metrics]],
        refused: list[dict[str, Any]],
        work: Path,
    ) -> ImportResult:
        stored = {variant: self._store(bundle) for variant, bundle, _ in built}
        # a Hugging Face checkpoint is kept (not shipped): a later distill, prune or finetune job starts from it
        checkpoint = sources.keep(self.store, req.bundle_root, work) if source == "hf" else None
        for _attempt in range(5):
            with Session(self.engine) as session:
                model = session.exec(select(Model).where(Model.name == req.model_name)).first()
                if model is None:
                    model = Model(
                        name=req.model_name, task=task.value, description=options.description, created_by=req.actor
                    )
                    session.add(model)
                    session.flush()
                assert model.id is not None
                last = session.exec(
                    select(func.max(ModelVersion.number)).where(ModelVersion.model_id == model.id)
                ).one()
                number = int(last or 0) + 1
                version = ModelVersion(
                    model_id=model.id,
                    number=number,
                    source=source,
                    description=options.description,
                    created_by=req.actor,
                    options=options.model_dump(mode="json", exclude={"eval_set"}, exclude_none=True),
                    refused=refused,
                    source_checkpoint=checkpoint,
                    lineage=req.lineage,
                    derive_job_id=req.derive_job_id,
                    derive_step=req.derive_step,
                )
                session.add(version)
                session.flush()
                assert version.id is not None
                for variant, bundle, metrics in built:
                    manifest = self._manifest(
                        req.model_name, number, variant, bundle, metrics, options, stored[variant]
                    )
                    signed = signing.sign(manifest, self.key.private)
                    session.add(
                        Artifact(
                            id=manifest.artifact_id,
                            version_id=version.id,
                            variant=variant,
                            size_bytes=manifest.total_size,
                            signed_manifest=signed.model_dump(mode="json"),
                            metrics=manifest.metrics.model_dump(mode="json", exclude_none=True),
                        )
                    )
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()
                    log.info("version number %d of %s taken concurrently; retrying", number, req.model_name)
                    continue
                return ImportResult(number, [v for v, _, _ in built], refused)
        raise BundleError("could not allocate a version number; try again")


def _same_graphs(a: ExportedBundle, b: ExportedBundle) -> bool:
    """True when every ONNX graph (and external data) of ``b`` is byte-identical to ``a``'s."""

    def digests(bundle: ExportedBundle) -> dict[str, str]:
        out = {}
        for rel in bundle.files():
            if rel.suffix in (".onnx", ".data") or rel.name.endswith(".onnx.data"):
                out[rel.as_posix()] = hashlib.sha256((bundle.root / rel).read_bytes()).hexdigest()
        return out

    return digests(a) == digests(b)


def load_signed(artifact: Artifact) -> SignedManifest:
    return SignedManifest.model_validate(artifact.signed_manifest)

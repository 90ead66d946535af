"""``slmfleet model``: register models (ONNX files, bundles, Hugging Face checkpoints) and inspect them."""

from __future__ import annotations

import json
import re
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from controller.cli.client import ApiClient
from controller.cli.files import read_json_object
from controller.cli.options import DEFAULT_DATA_DIR, ApiOpt, DataOpt, JsonOpt, TokenOpt
from controller.cli.output import data_console
from controller.registry.store import sha256_file

app = typer.Typer(help="Register and inspect models.", no_args_is_help=True)
console = Console(stderr=True)

OPTIONS_EXAMPLE = '{"anomaly": {"threshold": 0.5}}'
TASKS = "text-classification, embeddings, text-generation, text2text or anomaly"
ReferenceOpt = Annotated[
    Path | None,
    typer.Option(
        "--reference",
        help='JSON lines of {"input": {...}, "expected": {...}}: outputs your framework gave for these inputs;'
        " fp32 must reproduce them (within options.reference_tolerance, 1e-4) or the import fails",
    ),
]


def _options(
    task: str | None, variants: str | None, options_file: Path | None, description: str | None, extra: dict[str, Any]
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if options_file is not None:
        options = read_json_object(options_file, "options file", OPTIONS_EXAMPLE)
    if task:
        options["task"] = task
    if variants:
        options["variants"] = [v.strip() for v in variants.split(",") if v.strip()]
    if description:
        options["description"] = description
    options.update({k: v for k, v in extra.items() if v is not None})
    return options


def _pack(path: Path, workdir: Path) -> Path:
    """A directory becomes an uncompressed tar (models do not compress); files are sent as they are."""
    if path.is_file():
        return path
    if not path.is_dir():
        typer.echo(f"error: {path} does not exist", err=True)
        raise typer.Exit(2)
    archive = workdir / f"{path.name or 'bundle'}.tar"
    with tarfile.open(archive, "w") as tf:
        for item in sorted(path.rglob("*")):
            if item.is_file() and not item.name.startswith("."):
                tf.add(item, arcname=item.relative_to(path).as_posix())
    return archive


class _Counted:
    """A binary file whose reads advance a progress bar (httpx streams multipart file parts by reading)."""

    def __init__(self, f: BinaryIO, progress: Progress, task_id: Any) -> None:
        self.f, self.progress, self.task_id = f, progress, task_id

    def read(self, size: int = -1) -> bytes:
        block = self.f.read(size)
        self.progress.advance(self.task_id, len(block))
        return block

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def fileno(self) -> int:
        return self.f.fileno()


def _upload(
    client: ApiClient, name: str, path: Path, options: dict[str, Any], reference: Path | None = None
) -> dict[str, Any]:
    """Send the model, its options and its reference file as one multipart request (streamed from disk), then
    follow the import. Options travel in the form, not in the URL: a reference with embeddings runs to
    megabytes."""
    if reference is not None and not reference.is_file():
        typer.echo(f"error: reference file {reference} does not exist", err=True)
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory(prefix="slmfleet-upload-") as tmp, ExitStack() as files:
        payload = _pack(path, Path(tmp))
        size = payload.stat().st_size
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=True) as progress:
            task_id = progress.add_task(f"uploading {payload.name}", total=size)
            parts: dict[str, Any] = {
                "file": (payload.name, _Counted(files.enter_context(open(payload, "rb")), progress, task_id))
            }
            if reference is not None:
                parts["reference"] = (reference.name, files.enter_context(open(reference, "rb")), "application/jsonl")
            result: dict[str, Any] = client.request(
                "POST",
                f"/api/v1/models/{name}/versions",
                params={"wait": 0},
                data={"options": json.dumps(options)},
                files=parts,
                timeout=None,
            )
    return _follow(client, result)


def _follow(client: ApiClient, job: dict[str, Any]) -> dict[str, Any]:
    """Poll an import job with a progress bar until it ends; returns the version."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console, transient=True
    ) as progress:
        task_id = progress.add_task("importing", total=1.0)
        while job["status"] in ("queued", "running"):
            progress.update(task_id, completed=job["progress"], description=f"importing: {job['stage']}")
            time.sleep(0.5)
            job = client.request("GET", job["url"])
    if job["status"] == "failed":
        typer.echo(f"error: import failed: {job['error']}", err=True)
        raise typer.Exit(1)
    version: dict[str, Any] = client.request("GET", f"/api/v1/models/{job['model']}/versions/{job['version']}")
    return version


def _print_version(version: dict[str, Any]) -> None:
    table = Table(title=f"{version['model']} v{version['number']} ({version['task']}, from {version['source']})")
    for column in ("variant", "size", "quantized", "agreement", "reference", "p50", "peak RSS", "artifact"):
        table.add_column(column)
    for v in version["variants"]:
        m = v["metrics"]
        # fp32 is what the others are measured against, not measured against itself: "-"
        agreement = f"{m['agreement']:.4f} {m.get('agreement_kind', '')}" if m.get("agreement") is not None else "-"
        fraction = (v.get("quantization") or {}).get("weight_fraction")
        quantized = f"{fraction:.0%} weights" if fraction is not None else "-"
        reference = f"{m['reference']} ({m.get('reference_cases', 0)} cases)" if m.get("reference") else "no reference"
        latency = f"{m['latency_ms_p50']:.2f} ms" if m.get("latency_ms_p50") is not None else "-"
        rss = f"{m['peak_rss_bytes'] / 2**20:.0f} MiB" if m.get("peak_rss_bytes") else "-"
        artifact = v["artifact_id"][:12] + (" CORRUPT" if v.get("corrupt_at") else "")
        table.add_row(
            v["variant"],
            f"{v['size_bytes'] / 2**20:.1f} MiB",
            quantized,
            agreement,
            reference,
            latency,
            rss,
            artifact,
        )
    out = data_console()
    if not out.is_terminal:  # piped or in CI rich assumes 80 columns and cuts every cell: the table needs ~110
        out = data_console(width=max(out.width, 120))
    out.print(table)
    lineage = version.get("lineage")
    if lineage:
        data = f", data sha256 {lineage['data_sha256'][:16]}" if lineage.get("data_sha256") else ""
        console.print(
            f"lineage: {escape(lineage['step'])} of {escape(lineage['parent'])}{data}, job {lineage['job'][:12]},"
            f" settings {escape(json.dumps(lineage.get('settings') or {}))}"
        )
    for r in version.get("refused", []):
        console.print(f"[yellow]{escape(r['variant'])} refused:[/yellow] {escape(r['reason'])}")
    for v in version["variants"]:
        if v.get("corrupt_at"):
            console.print(
                f"[red]{escape(v['variant'])} is corrupt in the store:[/red] {escape(v.get('corrupt_reason') or '')}"
                f" (repair: slmfleet model repair {v['artifact_id']} FILE...)"
            )


@app.command()
def add(
    path: Annotated[Path, typer.Argument(help="an .onnx file, a bundle directory or an archive of one")],
    name: Annotated[str, typer.Option("--name", "-n", help="model name")],
    task: Annotated[str | None, typer.Option(help=f"{TASKS} (needed when the model is new)")] = None,
    variants: Annotated[str | None, typer.Option(help="comma-separated: fp32,int8,int4")] = None,
    description: Annotated[str | None, typer.Option(help="what this version is")] = None,
    options_file: Annotated[Path | None, typer.Option("--options", help="JSON file of import options")] = None,
    reference: ReferenceOpt = None,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Upload an ONNX model or bundle; the controller quantizes, validates, signs and stores it."""
    client = ApiClient(api, token, data_dir)
    version = _upload(client, name, path, _options(task, variants, options_file, description, {}), reference)
    typer.echo(json.dumps(version, indent=2)) if as_json else _print_version(version)


@app.command("import-hf")
def import_hf(
    checkpoint: Annotated[Path, typer.Argument(help="a Hugging Face checkpoint directory on local disk")],
    task: Annotated[str, typer.Option(help=TASKS)],
    name: Annotated[str | None, typer.Option("--name", "-n", help="model name [default: the directory name]")] = None,
    variants: Annotated[str | None, typer.Option(help="comma-separated: fp32,int8,int4")] = None,
    runtime: Annotated[str | None, typer.Option(help="text generation: auto, onnxruntime or onnxruntime-genai")] = None,
    description: Annotated[str | None, typer.Option(help="what this version is")] = None,
    options_file: Annotated[Path | None, typer.Option("--options", help="JSON file of import options")] = None,
    reference: ReferenceOpt = None,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Export a local Hugging Face checkpoint to ONNX (on the controller, which needs the convert extra)."""
    if not (checkpoint / "config.json").is_file():
        typer.echo(f"error: {checkpoint} is not a checkpoint directory (no config.json)", err=True)
        raise typer.Exit(2)
    client = ApiClient(api, token, data_dir)
    options = _options(task, variants, options_file, description, {"runtime": runtime})
    version = _upload(client, name or checkpoint.resolve().name, checkpoint, options, reference)
    typer.echo(json.dumps(version, indent=2)) if as_json else _print_version(version)


@app.command("list")
def list_(
    as_json: JsonOpt = False, api: ApiOpt = None, token: TokenOpt = None, data_dir: DataOpt = DEFAULT_DATA_DIR
) -> None:
    """List models."""
    models = ApiClient(api, token, data_dir).request("GET", "/api/v1/models")
    if as_json:
        typer.echo(json.dumps(models, indent=2))
        return
    table = Table(title=f"{len(models)} models")
    for column in ("name", "task", "versions", "latest", "description"):
        table.add_column(column)
    for m in models:
        table.add_row(m["name"], m["task"], str(m["versions"]), str(m["latest_version"] or "-"), m["description"][:60])
    data_console().print(table)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION")],
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Show a model's versions, or one version's variants."""
    client = ApiClient(api, token, data_dir)
    name, _, number = ref.partition("@")
    if number:
        version = client.request("GET", f"/api/v1/models/{name}/versions/{number}")
        typer.echo(json.dumps(version, indent=2)) if as_json else _print_version(version)
        return
    model = client.request("GET", f"/api/v1/models/{name}")
    if as_json:
        typer.echo(json.dumps(model, indent=2))
        return
    for version in model["version_list"]:
        _print_version(version)


def _artifact_ids(client: ApiClient, ref: str) -> list[str]:
    """An artifact id, or the artifacts of NAME@VERSION (all variants) or NAME@VERSION/VARIANT."""
    if re.fullmatch(r"[0-9a-f]{64}", ref):
        return [ref]
    m = re.fullmatch(r"([^@/]+)@(\d+)(?:/(\w+))?", ref)
    if m is None:
        typer.echo(f"error: {ref!r}: give an artifact id or NAME@VERSION[/VARIANT]", err=True)
        raise typer.Exit(2)
    version = client.request("GET", f"/api/v1/models/{m.group(1)}/versions/{m.group(2)}")
    ids = [v["artifact_id"] for v in version["variants"] if m.group(3) in (None, v["variant"])]
    if not ids:
        typer.echo(f"error: {m.group(1)} v{m.group(2)} has no {m.group(3)} variant", err=True)
        raise typer.Exit(2)
    return ids


def _candidates(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from (p for p in sorted(path.rglob("*")) if p.is_file())
        elif path.is_file():
            yield path
        else:
            typer.echo(f"error: {path} does not exist", err=True)
            raise typer.Exit(2)


@app.command()
def repair(
    ref: Annotated[str, typer.Argument(help="an artifact id, NAME@VERSION or NAME@VERSION/VARIANT")],
    sources: Annotated[
        list[Path] | None,
        typer.Argument(help="good copies: files or directories (the original model, a backup, a device's slot)"),
    ] = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """Check artifacts in the controller's store and repair damaged files from good copies.

    Only local files whose sha256 the artifact's manifest lists are uploaded; the controller then hashes
    every file of the artifact and clears its corrupt mark when all are intact (exit 0), else says which
    files are still damaged or missing (exit 1). Without SOURCES it only checks.
    """
    client = ApiClient(api, token, data_dir)
    local: dict[str, Path] = {}
    for path in _candidates(list(sources or [])):
        local.setdefault(sha256_file(path), path)
    broken = False
    for artifact_id in _artifact_ids(client, ref):
        signed = client.request("GET", f"/api/v1/artifacts/{artifact_id}/manifest")
        wanted = {f["sha256"]: f["path"] for f in signed["manifest"]["files"]}
        handles = [(wanted[sha], open(path, "rb")) for sha, path in local.items() if sha in wanted]  # noqa: SIM115
        try:
            files = [("file", (name, handle, "application/octet-stream")) for name, handle in handles]
            report = client.request(
                "POST", f"/api/v1/artifacts/{artifact_id}/repair", files=files or None, timeout=None
            )
        finally:
            for _, handle in handles:
                handle.close()
        table = Table(title=f"artifact {artifact_id[:16]}: {'intact' if report['ok'] else 'DAMAGED'}")
        for column in ("file", "sha256", "state"):
            table.add_column(column)
        for f in report["files"]:
            state = ("replaced, " if f["replaced"] else "") + ("ok" if f["ok"] else str(f["problem"]))
            table.add_row(f["path"], f["sha256"][:16], state)
        data_console().print(table)
        if not report["ok"]:
            broken = True
            needed = [f"{f['path']} (sha256 {f['sha256']})" for f in report["files"] if not f["ok"]]
            console.print(f"[red]still damaged:[/red] give a good copy of {escape(', '.join(needed))}")
    if broken:
        raise typer.Exit(1)

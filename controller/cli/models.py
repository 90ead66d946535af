"""``slmfleet model``: register models (ONNX files, bundles, Hugging Face checkpoints) and inspect them."""

from __future__ import annotations

import json
import re
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from controller.cli.client import ApiClient
from controller.cli.output import data_console
from controller.registry.store import sha256_file

app = typer.Typer(help="Register and inspect models.", no_args_is_help=True)
console = Console(stderr=True)

ApiOpt = Annotated[str | None, typer.Option("--api", help="controller URL [default: from the data dir]")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="SLMFLEET_TOKEN", help="operator token")]
DataOpt = Annotated[Path, typer.Option("--data-dir", help="controller data directory")]
TASKS = "text-classification, embeddings, text-generation, text2text or anomaly"


def _options(
    task: str | None, variants: str | None, options_file: Path | None, description: str | None, extra: dict[str, Any]
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if options_file is not None:
        try:
            options = json.loads(options_file.read_text())
        except (OSError, ValueError) as exc:
            typer.echo(f"error: {options_file}: {exc}", err=True)
            raise typer.Exit(2) from None
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


def _stream(path: Path, progress: Progress, task_id: Any) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(1024 * 1024):
            progress.advance(task_id, len(block))
            yield block


def _upload(client: ApiClient, name: str, path: Path, options: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="slmfleet-upload-") as tmp:
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
            result: dict[str, Any] = client.request(
                "POST",
                f"/api/v1/models/{name}/versions",
                params={"filename": payload.name, "options": json.dumps(options), "wait": 0},
                content=_stream(payload, progress, task_id),
                headers={"Content-Type": "application/octet-stream"},
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
    for column in ("variant", "size", "agreement", "latency p50", "peak RSS", "artifact"):
        table.add_column(column)
    for v in version["variants"]:
        m = v["metrics"]
        agreement = f"{m['agreement']:.4f} {m.get('agreement_kind', '')}" if m.get("agreement") is not None else "-"
        latency = f"{m['latency_ms_p50']:.2f} ms" if m.get("latency_ms_p50") is not None else "-"
        rss = f"{m['peak_rss_bytes'] / 2**20:.0f} MiB" if m.get("peak_rss_bytes") else "-"
        artifact = v["artifact_id"][:16] + (" CORRUPT" if v.get("corrupt_at") else "")
        table.add_row(v["variant"], f"{v['size_bytes'] / 2**20:.1f} MiB", agreement, latency, rss, artifact)
    data_console().print(table)
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
    as_json: Annotated[bool, typer.Option("--json", help="print the version as JSON")] = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """Upload an ONNX model or bundle; the controller quantizes, validates, signs and stores it."""
    client = ApiClient(api, token, data_dir)
    version = _upload(client, name, path, _options(task, variants, options_file, description, {}))
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
    as_json: Annotated[bool, typer.Option("--json", help="print the version as JSON")] = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
) -> None:
    """Export a local Hugging Face checkpoint to ONNX (on the controller, which needs the convert extra)."""
    if not (checkpoint / "config.json").is_file():
        typer.echo(f"error: {checkpoint} is not a checkpoint directory (no config.json)", err=True)
        raise typer.Exit(2)
    client = ApiClient(api, token, data_dir)
    options = _options(task, variants, options_file, description, {"runtime": runtime})
    version = _upload(client, name or checkpoint.resolve().name, checkpoint, options)
    typer.echo(json.dumps(version, indent=2)) if as_json else _print_version(version)


@app.command("list")
def list_(api: ApiOpt = None, token: TokenOpt = None, data_dir: DataOpt = Path(".slmfleet")) -> None:
    """List models."""
    models = ApiClient(api, token, data_dir).request("GET", "/api/v1/models")
    table = Table(title=f"{len(models)} models")
    for column in ("name", "task", "versions", "latest", "description"):
        table.add_column(column)
    for m in models:
        table.add_row(m["name"], m["task"], str(m["versions"]), str(m["latest_version"] or "-"), m["description"][:60])
    data_console().print(table)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = Path(".slmfleet"),
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

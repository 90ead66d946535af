"""``slmfleet model distill|prune|finetune|derive`` and ``slmfleet job list|show|cancel|wait``: derive jobs."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controller.cli.client import ApiClient
from controller.cli.files import usage_error
from controller.cli.options import DEFAULT_DATA_DIR, SHORT_ID, ApiOpt, DataOpt, JsonOpt, TokenOpt
from controller.cli.output import data_console
from controller.jobs.steps import StepsError, parse_step_arg

app = typer.Typer(help="Derive jobs (distill, prune, finetune): list, show, cancel, wait.", no_args_is_help=True)
console = Console(stderr=True)

WaitOpt = Annotated[bool, typer.Option("--wait", help="follow the job with a progress bar until it ends")]
DataFileOpt = Annotated[Path | None, typer.Option("--data", help='JSON lines: {"text": ...} (labeled: "label")')]
TargetOpt = Annotated[
    str | None, typer.Option("--target-model", help="model for versions whose task changes (a fine-tuned classifier)")
]


def _ref(ref: str) -> tuple[str, int]:
    name, _, number = ref.partition("@")
    if not name or not number.isdigit():
        raise usage_error(f"{ref!r}: give NAME@VERSION (for example minilm@1)")
    return name, int(number)


def _submit(
    client: ApiClient,
    ref: str,
    route: str,
    fields: dict[str, str],
    data: Path | None,
    target: str | None,
) -> dict[str, Any]:
    name, number = _ref(ref)
    if data is not None and not data.is_file():
        raise usage_error(f"data file {data} does not exist")
    if target:
        fields["target_model"] = target
    with ExitStack() as stack:
        files = {"data": (data.name, stack.enter_context(open(data, "rb")), "application/jsonl")} if data else None
        job: dict[str, Any] = client.request(
            "POST", f"/api/v1/models/{name}/versions/{number}/{route}", data=fields, files=files, timeout=None
        )
    return job


def _done(job: dict[str, Any], wait: bool, as_json: bool, client: ApiClient) -> None:
    if wait:
        job = follow(client, job)
    if as_json:
        typer.echo(json.dumps(job, indent=2))
    else:
        _print_job(job)
    if job["status"] in ("failed", "cancelled"):
        raise typer.Exit(1)


def _one(
    kind: str,
    ref: str,
    params: dict[str, Any],
    data: Path | None,
    target: str | None,
    wait: bool,
    as_json: bool,
    api: str | None,
    token: str | None,
    data_dir: Path,
) -> None:
    client = ApiClient(api, token, data_dir)
    clean = {k: v for k, v in params.items() if v is not None}
    job = _submit(client, ref, kind, {"params": json.dumps(clean)}, data, target)
    _done(job, wait, as_json, client)


def distill(
    ref: Annotated[str, typer.Argument(help="the teacher: NAME@VERSION (imported from a Hugging Face checkpoint)")],
    student: Annotated[
        str, typer.Option(help="bert-tiny, bert-mini, bert-small, or layers=3[,hidden=256,heads=4,ffn=1024]")
    ],
    data: DataFileOpt = None,
    epochs: Annotated[int | None, typer.Option(help="passes over the data [default: 3]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="[default: 32]")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate [default: 1e-4]")] = None,
    target_model: TargetOpt = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Train a smaller student to reproduce a version on your unlabeled texts: a new version, with lineage."""
    params = {"student": student, "epochs": epochs, "batch_size": batch_size, "lr": lr}
    _one("distill", ref, params, data, target_model, wait, as_json, api, token, data_dir)


def prune(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION (imported from a Hugging Face checkpoint)")],
    heads: Annotated[float, typer.Option(help="fraction of attention heads to remove (0.5: half)")],
    ffn: Annotated[float, typer.Option(help="fraction of feed-forward neurons to remove")],
    recover_data: Annotated[
        Path | None,
        typer.Option("--recover-data", help="texts for a short recovery distillation from the unpruned model"),
    ] = None,
    recover_epochs: Annotated[int | None, typer.Option(help="[default: 1]")] = None,
    target_model: TargetOpt = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Structured pruning: remove attention heads and feed-forward neurons (smaller matrices)."""
    params = {"heads": heads, "ffn": ffn, "recover": recover_data is not None, "recover_epochs": recover_epochs}
    _one("prune", ref, params, recover_data, target_model, wait, as_json, api, token, data_dir)


def finetune(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION (imported from a Hugging Face checkpoint)")],
    data: Annotated[Path, typer.Option("--data", help='labeled JSON lines: {"text": ..., "label": ...}')],
    lora_rank: Annotated[int | None, typer.Option(help="LoRA adapters of this rank, merged into the weights")] = None,
    epochs: Annotated[int | None, typer.Option(help="[default: 3]")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate [default: 5e-5]")] = None,
    target_model: TargetOpt = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Fine-tune on your labeled examples (a classification head; a held-out split measures it)."""
    params = {"lora_rank": lora_rank, "epochs": epochs, "lr": lr}
    _one("finetune", ref, params, data, target_model, wait, as_json, api, token, data_dir)


def derive(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION (imported from a Hugging Face checkpoint)")],
    step: Annotated[
        list[str],
        typer.Option(
            "--step",
            help="KIND:NAME=VALUE,... in order, e.g. distill:student=bert-mini,epochs=2  prune:heads=0.5,ffn=0.5"
            "  quantize:variants=int8+int4",
        ),
    ],
    data: DataFileOpt = None,
    target_model: TargetOpt = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Chain steps (each kept as a version with its lineage): distill, then prune, then int8, ..."""
    try:
        steps = [parse_step_arg(s).model_dump() for s in step]
    except StepsError as exc:
        raise usage_error(str(exc)) from None
    client = ApiClient(api, token, data_dir)
    job = _submit(client, ref, "derive", {"steps": json.dumps(steps)}, data, target_model)
    _done(job, wait, as_json, client)


def follow(client: ApiClient, job: dict[str, Any]) -> dict[str, Any]:
    """Poll a job with a progress bar until it ends."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task_id = progress.add_task("queued", total=1.0)
        while job["status"] in ("queued", "running"):
            progress.update(task_id, completed=job["progress"], description=escape(job["message"][:70]))
            time.sleep(0.5)
            job = client.request("GET", job["url"])
    return job


def _print_job(job: dict[str, Any]) -> None:
    out = data_console()
    steps = " > ".join(s["kind"] for s in job["steps"])
    out.print(f"derive job {job['id'][:SHORT_ID]}: {job['model']}@{job['base_version']}: {steps}")
    out.print(f"status: {job['status']} ({job['progress']:.0%}) {escape(job['message'])}")
    if job.get("error"):
        out.print(f"[red]error:[/red] {escape(job['error'])}")
    if job["report"]:
        table = Table(title="report")
        for column in ("step", "version", "params", "quality", "size (fp32/int8)", "p50 int8", "seconds"):
            table.add_column(column)
        for r in job["report"]:
            variants = r.get("variants", {})
            sizes = "/".join(f"{variants[v]['size_bytes'] / 2**20:.1f}" for v in ("fp32", "int8") if v in variants)
            p50 = (variants.get("int8") or variants.get("fp32") or {}).get("latency_ms_p50")
            quality = ", ".join(f"{k} {v:.3f}" for k, v in (r.get("quality") or {}).items())
            params = f"{r.get('params_before', '-')} > {r.get('params_after', '-')}"
            seconds = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
            table.add_row(
                r["kind"], r["version"], params, quality, f"{sizes} MiB", f"{p50:.2f} ms" if p50 else "-", seconds
            )
        out.print(table)


@app.command("list")
def list_(
    model: Annotated[str | None, typer.Option(help="only this model's jobs")] = None,
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """List derive jobs, newest first."""
    params = {"model": model} if model else None
    jobs = ApiClient(api, token, data_dir).request("GET", "/api/v1/derive-jobs", params=params)
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
        return
    table = Table(title=f"{len(jobs)} derive jobs")
    for column in ("id", "base", "steps", "status", "progress", "produced", "message"):
        table.add_column(column)
    for j in jobs:
        table.add_row(
            j["id"][:SHORT_ID],
            f"{j['model']}@{j['base_version']}",
            " > ".join(s["kind"] for s in j["steps"]),
            j["status"],
            f"{j['progress']:.0%}",
            ", ".join(j["produced"]),
            escape(j["message"][:50]),
        )
    data_console().print(table)


@app.command()
def show(
    job_id: Annotated[str, typer.Argument(help="a job id or a unique prefix of one")],
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Show a job: status, progress, and the report of each step done."""
    job = ApiClient(api, token, data_dir).request("GET", f"/api/v1/derive-jobs/{job_id}")
    typer.echo(json.dumps(job, indent=2)) if as_json else _print_job(job)


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="a job id or a unique prefix of one")],
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Cancel a job: its worker stops at the next safe point; the step it was on makes no version."""
    job = ApiClient(api, token, data_dir).request("POST", f"/api/v1/derive-jobs/{job_id}/cancel")
    typer.echo(
        f"derive job {job['id'][:SHORT_ID]}: {job['status']}" + (" (stopping)" if job["status"] == "running" else "")
    )


@app.command()
def wait(
    job_id: Annotated[str, typer.Argument(help="a job id or a unique prefix of one")],
    as_json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
    data_dir: DataOpt = DEFAULT_DATA_DIR,
) -> None:
    """Follow a job with a progress bar until it ends (exit 1 when it failed or was cancelled)."""
    client = ApiClient(api, token, data_dir)
    _done(client.request("GET", f"/api/v1/derive-jobs/{job_id}"), True, as_json, client)

"""``slmfleet artifacts migrate``: copy a single controller's artifacts (and its signing key) to a shared store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import Session, select

from controller.db.engine import make_engine, migrate
from controller.db.models import Artifact
from controller.db.secrets import SharedSecrets
from controller.errors import ControllerError
from controller.registry import keys
from controller.registry.service import open_store
from controller.registry.store import ContentStore
from controller.settings import load_settings

app = typer.Typer(help="The artifact store: where model files live.", no_args_is_help=True)


@app.command("migrate")
def migrate_store(
    to: Annotated[str, typer.Option("--to", help="database, or the absolute path of a directory every replica mounts")],
    data_dir: Annotated[
        Path | None, typer.Option(help="the controller's data directory [default: ./.slmfleet]")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML settings file (database_url, chunk_size)")] = None,
) -> None:
    """Copy every artifact's files from the local store (<data_dir>/registry/store) to ``--to``, and the signing key
    into the database; then set artifact_store to the same value. Safe to run again (what is there is skipped)."""
    try:
        settings = load_settings(config, data_dir=data_dir, artifact_store=to)
    except ControllerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if settings.artifact_store == "local":
        typer.echo("error: --to is database or a shared directory's absolute path", err=True)
        raise typer.Exit(2)
    source = settings.data_dir / "registry" / "store"
    if not (source / "blobs").is_dir():
        typer.echo(f"error: no local artifact store at {source}", err=True)
        raise typer.Exit(2)
    engine = make_engine(settings.resolved_database_url)
    try:
        migrate(engine)
        local = ContentStore(source)
        target = open_store(settings.artifact_store, engine, source, settings.chunk_size)
        with Session(engine) as session:
            manifests = [signed["manifest"] for signed in session.exec(select(Artifact.signed_manifest)).all()]
        copied = present = 0
        missing: list[str] = []
        for manifest in manifests:
            for f in manifest["files"]:
                if target.has(f["sha256"]):
                    present += 1
                elif not local.has(f["sha256"]):
                    missing.append(f"{manifest['model']} v{manifest['version']} {manifest['variant']}: {f['path']}")
                else:
                    target.put_file_chunked(local.path(f["sha256"]), int(manifest["chunk_size"]))
                    copied += 1
        try:
            key = keys.load_shared(SharedSecrets(engine, settings.shared_secrets_key), settings.data_dir / "keys")
        except ControllerError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    finally:
        engine.dispose()
    typer.echo(
        f"{copied} files copied to the {target.kind} store, {present} already there, from {len(manifests)} artifacts;"
        f" signing key {key.key_id} shared in the database\n"
        f'now set artifact_store = "{settings.artifact_store}" (or SLMFLEET_ARTIFACT_STORE) on every replica'
    )
    if missing:
        typer.echo("missing from the local store (repair with 'slmfleet model repair'):\n  " + "\n  ".join(missing))
        raise typer.Exit(1)

"""Taking a model upload in: streamed into a staging directory, its options checked, archives unpacked, and
queued as an import job. The REST route and the dashboard's upload form both go through here; the form
checks its CSRF token and builds the options from its fields between the two steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
from starlette.requests import Request

from controller.registry.bundles import parse_options
from controller.registry.reference import read_reference_file, with_reference
from controller.registry.service import RegistryService
from controller.registry.upload import Upload, receive, remove_tree


@dataclass
class Received:
    staging: Path
    upload: Upload

    @property
    def files(self) -> list[str]:
        return [p.as_posix() for p in self.upload.files]

    def discard(self) -> None:
        remove_tree(self.staging)


async def receive_upload(registry: RegistryService, request: Request, max_bytes: int) -> Received:
    """Stream the request's files to a new staging directory (removed again if this fails); a ``reference``
    part (the operator's expected outputs) is kept beside them, not in the bundle."""
    staging = registry.new_staging()
    try:
        upload = await receive(request, staging / "upload", max_bytes, side_parts=("reference",))
    except BaseException:
        remove_tree(staging)
        raise
    return Received(staging, upload)


async def queue_import(
    registry: RegistryService, received: Received, name: str, options: str | None, actor: str
) -> str:
    """Check the options (JSON), unpack, and queue the import; returns the job's id. Raises BundleError or
    UploadError (the staging directory is removed then); on success the import job owns it."""
    try:
        parsed = parse_options(options)
        if "reference" in received.upload.parts:
            parsed = with_reference(parsed, read_reference_file(received.upload.parts["reference"]))
        bundle_root = await anyio.to_thread.run_sync(registry.prepare, received.staging, received.files)
    except BaseException:
        received.discard()
        raise
    return registry.submit(name, received.staging, bundle_root, parsed, actor)

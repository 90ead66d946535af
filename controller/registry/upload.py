"""Receiving model uploads: streamed to disk with a size cap, archives unpacked safely.

Nothing is held in memory but small form fields. An upload over the cap is
cut off as soon as the cap is crossed (413); archives are unpacked with
checks against path traversal, links, device files, too many members and
decompression bombs (the byte count is enforced while writing, not trusted
from headers).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

MAX_FIELD_BYTES = 1024 * 1024
_SAFE_PART = re.compile(r"^[A-Za-z0-9._+@=-]+$")


class UploadError(Exception):
    """An upload that cannot be accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    root: Path
    files: list[PurePosixPath] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    size: int = 0
    #: named parts kept apart from the bundle's files (``receive``'s ``side_parts``), by part name
    parts: dict[str, Path] = field(default_factory=dict)


def safe_relative(name: str) -> PurePosixPath:
    """A relative path inside the bundle, or UploadError for anything that could escape it."""
    name = name.replace("\\", "/")
    path = PurePosixPath(name)
    if not name or path.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise UploadError(f"file name {name!r}: absolute paths are not allowed")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise UploadError(f"file name {name!r}: '..' is not allowed (path traversal)")
    for p in parts:
        if not _SAFE_PART.match(p) or len(p) > 255:
            raise UploadError(f"file name {name!r}: use letters, digits and . _ + @ = - only")
    return PurePosixPath(*parts)


async def receive(request: Request, dest: Path, max_bytes: int, side_parts: tuple[str, ...] = ()) -> Upload:
    """Stream the request body into ``dest``: multipart form data, or a raw body (``?filename=``).

    Multipart parts named in ``side_parts`` (a file or a plain field) are not bundle files: each is streamed
    to a file of its own beside ``dest`` (``Upload.parts``), under the same size cap as the whole upload.
    """
    dest.mkdir(parents=True, exist_ok=True)
    upload = Upload(dest)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise UploadError(f"upload of {int(declared)} bytes exceeds the limit of {max_bytes} bytes", 413)
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise UploadError("multipart upload without a boundary")
        await _receive_multipart(request, upload, boundary, max_bytes, side_parts)
    else:
        name = request.query_params.get("filename") or "upload.bin"
        rel = safe_relative(name)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            async for block in request.stream():
                upload.size += len(block)
                if upload.size > max_bytes:
                    raise UploadError(f"upload exceeds the limit of {max_bytes} bytes", 413)
                out.write(block)
        upload.files.append(rel)
    if not upload.files:
        raise UploadError("the upload holds no file: send the model as a 'file' part (multipart) or as the body")
    return upload


async def _receive_multipart(
    request: Request, upload: Upload, boundary: bytes, max_bytes: int, side_parts: tuple[str, ...]
) -> None:
    state: dict[str, Any] = {
        "headers": {},
        "field": b"",
        "value": b"",
        "out": None,
        "name": None,
        "fname": None,
        "side": None,
    }
    field_bytes = bytearray()
    error: list[UploadError] = []

    def on_part_begin() -> None:
        state.update(headers={}, out=None, name=None, fname=None, side=None)
        field_bytes.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state["headers"].get("content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        fname = disp.get(b"filename")
        state["name"] = name
        if name in side_parts:
            if name in upload.parts:
                error.append(UploadError(f"part {name!r} is sent twice"))
                return
            target = upload.root.parent / "parts" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            state["out"] = open(target, "wb")  # noqa: SIM115 - closed in on_part_end
            state["side"] = name
            upload.parts[name] = target
        elif fname is not None:
            try:
                rel = safe_relative(fname.decode("utf-8", "replace"))
            except UploadError as exc:
                error.append(exc)
                return
            if rel in upload.files:
                error.append(UploadError(f"file {rel} is uploaded twice"))
                return
            target = upload.root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            state["out"] = open(target, "wb")  # noqa: SIM115 - closed in on_part_end
            state["fname"] = rel

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["out"] is not None:
            state["out"].write(data[start:end])
        elif state["name"] is not None:
            field_bytes.extend(data[start:end])
            if len(field_bytes) > MAX_FIELD_BYTES:
                error.append(UploadError(f"form field {state['name']!r} is larger than {MAX_FIELD_BYTES} bytes"))

    def on_part_end() -> None:
        if state["out"] is not None:
            state["out"].close()
            if state["side"] is None:
                upload.files.append(state["fname"])
            state["out"] = None
        elif state["name"]:
            upload.fields[state["name"]] = field_bytes.decode("utf-8", "replace")

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for block in request.stream():
            upload.size += len(block)
            if upload.size > max_bytes:
                raise UploadError(f"upload exceeds the limit of {max_bytes} bytes", 413)
            parser.write(block)
            if error:
                raise error[0]
        parser.finalize()
    except UploadError:
        raise
    except Exception as exc:  # python-multipart raises its own errors on malformed bodies
        raise UploadError(f"malformed multipart body: {exc}") from None
    finally:
        if state["out"] is not None:
            state["out"].close()


# ----------------------------------------------------------------- archives --


@dataclass(frozen=True)
class UnpackLimits:
    max_bytes: int
    max_files: int = 10_000
    max_ratio: float = 200.0


def is_archive(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(262)
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar"


def unpack(archive: Path, dest: Path, limits: UnpackLimits) -> Path:
    """Extract ``archive`` into ``dest`` safely; returns the bundle root (a lone top directory is entered)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _unzip(archive, dest, limits)
        else:
            _untar(archive, dest, limits)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, gzip.BadGzipFile, OSError) as exc:
        raise UploadError(f"the archive cannot be read: {exc}") from None
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


class _Budget:
    def __init__(self, limits: UnpackLimits, compressed: int) -> None:
        self.limits = limits
        self.compressed = max(compressed, 1)
        self.written = 0
        self.files = 0

    def add_file(self) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise UploadError(f"the archive holds more than {self.limits.max_files} files")

    def add_bytes(self, n: int) -> None:
        self.written += n
        if self.written > self.limits.max_bytes:
            raise UploadError(
                f"the archive unpacks to more than {self.limits.max_bytes} bytes (a decompression bomb?)", 413
            )
        if self.written > 64 * 1024 * 1024 and self.written / self.compressed > self.limits.max_ratio:
            raise UploadError(
                f"the archive expands more than {self.limits.max_ratio:.0f}x: refused as a decompression bomb", 413
            )


def _copy(src: Any, target: Path, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        while block := src.read(1024 * 1024):
            budget.add_bytes(len(block))
            out.write(block)


def _unzip(archive: Path, dest: Path, limits: UnpackLimits) -> None:
    budget = _Budget(limits, archive.stat().st_size)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            mode = (info.external_attr >> 16) & 0o170000
            if mode and mode not in (0o100000,):
                raise UploadError(f"archive member {info.filename!r} is not a regular file (links are refused)")
            rel = safe_relative(info.filename)
            budget.add_file()
            with zf.open(info) as src:
                _copy(src, dest / rel, budget)


def _untar(archive: Path, dest: Path, limits: UnpackLimits) -> None:
    budget = _Budget(limits, archive.stat().st_size)
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            if member.isdir():
                continue
            if not member.isreg():
                raise UploadError(f"archive member {member.name!r} is not a regular file (links are refused)")
            rel = safe_relative(member.name)
            budget.add_file()
            src = tf.extractfile(member)
            if src is None:
                raise UploadError(f"archive member {member.name!r} cannot be read")
            with src:
                _copy(src, dest / rel, budget)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        os.chmod(path, 0o700)
        shutil.rmtree(path, ignore_errors=True)

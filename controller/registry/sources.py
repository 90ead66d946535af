"""Source checkpoints: the Hugging Face checkpoint a version was imported from, kept in the content store.

A checkpoint directory is packed into one deterministic tar (sorted names, no owners or times) stored under its
sha256, like any blob; the version's ``source_checkpoint`` names it. It is never part of a manifest (devices never
receive it); it is what a derive job (distill, prune, finetune) starts from.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from controller.registry.bundles import HINTS_FILE
from controller.registry.store import ArtifactStore
from controller.registry.upload import UnpackLimits, unpack

__all__ = ["fetch", "keep", "pack"]


def pack(root: Path, dest: Path) -> Path:
    """``root``'s files (hidden ones and the import hints left out) as an uncompressed tar at ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root)
            if rel.as_posix() == HINTS_FILE or any(part.startswith(".") for part in rel.parts):
                continue
            info = tar.gettarinfo(str(path), arcname=f"checkpoint/{rel.as_posix()}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return dest


def keep(store: ArtifactStore, root: Path, work: Path) -> str:
    """Store the checkpoint at ``root``; its sha256."""
    tar = pack(root, work / "source-checkpoint.tar")
    try:
        sha, _size = store.put_file(tar)
    finally:
        tar.unlink(missing_ok=True)
    return sha


def fetch(store: ArtifactStore, sha256: str, dest: Path, max_bytes: int) -> Path:
    """The checkpoint stored under ``sha256`` unpacked below ``dest``; its directory."""
    dest.mkdir(parents=True, exist_ok=True)
    tar = dest / "checkpoint.tar"
    tar.write_bytes(store.read(sha256))
    try:
        return unpack(tar, dest / "unpacked", UnpackLimits(max_bytes))
    finally:
        tar.unlink(missing_ok=True)

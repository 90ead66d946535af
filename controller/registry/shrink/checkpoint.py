"""Resumable state in the step's work_dir, and the atomic writing of its output checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE_FILE = "state.pt"


def save_state(work_dir: Path, name: str, state: dict[str, Any]) -> None:
    """``work_dir/name`` written whole or not at all (tmp file, fsync, rename)."""
    import torch

    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / name
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def load_state(work_dir: Path, name: str, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state when it was saved for the same settings and data, else None."""
    import torch

    path = work_dir / name
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a file cut short by a crash before the rename cannot exist; anything else: start over
        return None
    if json.dumps(state.get("fingerprint"), sort_keys=True) != json.dumps(fingerprint, sort_keys=True):
        return None
    return dict(state)


def write_output(out: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)``, then move the complete directory to ``out`` (replacing an older one)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)

"""A tiny sentence-transformers teacher imported from its Hugging Face checkpoint, and data files, for the
derive job tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from tests.registry.shrink_models import sentences, tiny_bert

#: a student half the teacher's depth with a narrow FFN: trains in seconds on 2 cores
STUDENT = "layers=2,ffn=32"


def checkpoint_tar(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(root, arcname=root.name)
    return buf.getvalue()


def teacher_checkpoint(root: Path) -> Path:
    return tiny_bert(root / "teacher", layers=4, hidden=64, heads=4, ffn=256)


def texts_file(path: Path, n: int = 120) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in sentences(n)))
    return path


def labeled_file(path: Path, n: int = 120) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in sentences(n)))
    return path


def import_options(**extra: Any) -> str:
    return json.dumps({"task": "embeddings", "variants": ["fp32", "int8"], **extra})

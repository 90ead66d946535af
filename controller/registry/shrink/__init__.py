"""Making models smaller on the controller: distillation, structured pruning and fine-tuning.

Each step takes a local Hugging Face checkpoint directory and writes another one (``out``) that
``controller.registry.convert.export_hf`` accepts, so the importer turns it into a quantized, evaluated,
signed version like any other. Steps save resumable state in ``ctx.work_dir`` and continue from it when
called again; ``out`` appears complete or not at all. torch and transformers (the ``convert`` extra) are
imported lazily; nothing here touches the network, a database or HTTP. The modules are named
``distillation``, ``pruning`` and ``finetuning``: a submodule named like a function would replace that
function on the package once imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ShrinkError(Exception):
    """Bad input or an impossible request; the message is for the operator (what, why, what to do)."""


class Cancelled(Exception):
    """Raised by a step when ``ctx.cancelled()`` became true (at a safe point, state saved)."""


@dataclass
class StepContext:
    #: persistent; survives a controller restart. A step saves resumable state here and resumes from it
    #: when called again with the same work_dir and arguments.
    work_dir: Path
    #: fraction 0..1 of this step, short message ("epoch 2/3, loss 0.041")
    progress: Callable[[float, str], None]
    #: polled between batches; the step raises Cancelled when it returns True
    cancelled: Callable[[], bool]
    threads: int = 1
    seed: int = 0


@dataclass
class StepReport:
    step: str  # "distill" | "prune" | "finetune"
    settings: dict[str, Any]  # everything needed to reproduce (shape, epochs, lr, fractions, ...)
    data_sha256: str | None  # of the data file as given (never the data)
    examples: int  # used for training
    held_out: int  # held out for the quality figures
    #: distill/prune: cosine_mean, cosine_p5 (embeddings) or agreement (classifiers); prune also
    #: *_before_recovery; finetune: accuracy, baseline_accuracy (zero-shot prototypes), ...
    quality: dict[str, float]
    params_before: int
    params_after: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_student(spec: str) -> dict[str, int]:
    """'bert-tiny' | 'bert-mini' | 'bert-small' | 'layers=3' | 'layers=3,hidden=256,heads=4,ffn=1024' -> shape.

    Shapes without hidden keep the teacher's hidden size (and initialise from the teacher's layers).
    """
    from controller.registry.shrink.shapes import parse_student as parse

    return parse(spec)


def read_texts(path: Path, limit: int = 200_000) -> tuple[list[str], str]:
    """JSON lines of ``{"text": ...}`` or a JSON string per line -> (texts, sha256 of the file)."""
    from controller.registry.shrink.data import read_texts as read

    return read(path, limit)


def read_labeled(path: Path, limit: int = 200_000) -> tuple[list[tuple[str, str]], str]:
    """JSON lines of ``{"text": ..., "label": ...}`` -> (examples, sha256 of the file)."""
    from controller.registry.shrink.data import read_labeled as read

    return read(path, limit)


def distill(
    teacher: Path,
    out: Path,
    ctx: StepContext,
    *,
    texts: list[str],
    student: str,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 1e-4,
    max_length: int = 128,
    held_out: float = 0.1,
    data_sha256: str | None = None,
) -> StepReport:
    """Train a smaller ``student`` shape to reproduce ``teacher`` on ``texts``; write it to ``out``."""
    from controller.registry.shrink.distillation import distill as run

    return run(
        teacher,
        out,
        ctx,
        texts=texts,
        student=student,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        max_length=max_length,
        held_out=held_out,
        data_sha256=data_sha256,
    )


def prune(
    model: Path,
    out: Path,
    ctx: StepContext,
    *,
    heads: float,
    ffn: float,
    recover_texts: list[str] | None = None,
    recover_epochs: int = 1,
    max_length: int = 128,
    held_out: float = 0.1,
    data_sha256: str | None = None,
) -> StepReport:
    """Remove a fraction of attention heads and FFN neurons (smaller matrices), optionally recover by distillation."""
    from controller.registry.shrink.pruning import prune as run

    return run(
        model,
        out,
        ctx,
        heads=heads,
        ffn=ffn,
        recover_texts=recover_texts,
        recover_epochs=recover_epochs,
        max_length=max_length,
        held_out=held_out,
        data_sha256=data_sha256,
    )


def finetune(
    model: Path,
    out: Path,
    ctx: StepContext,
    *,
    examples: list[tuple[str, str]],
    lora_rank: int | None = None,
    epochs: int = 3,
    lr: float = 5e-5,
    max_length: int = 128,
    held_out: float = 0.2,
    data_sha256: str | None = None,
) -> StepReport:
    """A classification head (and optionally LoRA adapters merged into the weights) trained on ``examples``."""
    from controller.registry.shrink.finetuning import finetune as run

    return run(
        model,
        out,
        ctx,
        examples=examples,
        lora_rank=lora_rank,
        epochs=epochs,
        lr=lr,
        max_length=max_length,
        held_out=held_out,
        data_sha256=data_sha256,
    )


__all__ = [
    "Cancelled",
    "ShrinkError",
    "StepContext",
    "StepReport",
    "distill",
    "finetune",
    "parse_student",
    "prune",
    "read_labeled",
    "read_texts",
]

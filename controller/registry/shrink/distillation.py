"""Distillation: a smaller student trained to reproduce a teacher's sentence vectors or soft labels."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from controller.registry.shrink import ShrinkError, StepContext, StepReport
from controller.registry.shrink.checkpoint import load_state, save_state, write_output
from controller.registry.shrink.data import check_fraction, split
from controller.registry.shrink.models import (
    Encoder,
    copy_side_files,
    detect_task,
    from_config,
    load_config,
    load_model,
    load_tokenizer,
    parameters,
    pooling_of,
    set_pooling_width,
)
from controller.registry.shrink.report import quality
from controller.registry.shrink.shapes import parse_student, student_config, teacher_layers
from controller.registry.shrink.train import run_loop
from wire.manifest import Task

log = logging.getLogger(__name__)

#: Softmax temperature of the soft labels a classifier student learns (Hinton et al.; DistilBERT uses 2).
TEMPERATURE = 2.0


def texts_digest(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


def check_training(texts: list[str], epochs: int, batch_size: int, lr: float, max_length: int) -> None:
    if not texts or not any(t.strip() for t in texts):
        raise ShrinkError("no texts to learn from: give a JSON-lines file with at least a few texts")
    if epochs < 1 or batch_size < 1 or max_length < 8:
        raise ShrinkError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1, max_length >= 8")
    if not lr > 0:
        raise ShrinkError(f"lr must be positive, got {lr}")


def teacher_outputs(
    ctx: StepContext, name: str, teacher: Any, encoder: Encoder, task: Task, texts: list[str], source: str
) -> Any:
    """The teacher's outputs on ``texts``, computed once (no grad) and cached in the work dir."""
    import torch

    fingerprint = {
        "texts": texts_digest(texts),
        "max_length": encoder.max_length,
        "teacher": source,
        "task": task.value,
    }
    state = load_state(ctx.work_dir, name, fingerprint)
    if state is not None:
        return state["outputs"]
    parts = []
    batch = 64
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            if ctx.cancelled():
                from controller.registry.shrink import Cancelled

                raise Cancelled("cancelled while computing the teacher's outputs")
            parts.append(encoder.outputs(teacher, texts[i : i + batch], task))
            ctx.progress(
                0.15 * min(1.0, (i + batch) / len(texts)), f"teacher outputs {min(i + batch, len(texts))}/{len(texts)}"
            )
    outputs = torch.cat(parts)
    save_state(ctx.work_dir, name, {"fingerprint": fingerprint, "outputs": outputs})
    return outputs


def distill_loss(task: Task, encoder: Encoder, student: Any, texts: list[str], targets: Any) -> Any:
    """1 - cosine to the teacher's vectors (embeddings) or KL to its soft labels at TEMPERATURE (classifiers)."""
    import torch

    feeds = encoder.batch(texts)
    if task == Task.EMBEDDINGS:
        vectors = encoder.vectors(student, feeds)
        return (1.0 - torch.nn.functional.cosine_similarity(vectors, targets, dim=-1)).mean()
    logits = student(**feeds).logits
    return torch.nn.functional.kl_div(
        torch.log_softmax(logits / TEMPERATURE, dim=-1),
        torch.softmax(targets / TEMPERATURE, dim=-1),
        reduction="batchmean",
    ) * (TEMPERATURE**2)


def train_student(
    ctx: StepContext,
    *,
    name: str,
    fingerprint: dict[str, Any],
    task: Task,
    encoder: Encoder,
    student: Any,
    texts: list[str],
    targets: Any,
    epochs: int,
    batch_size: int,
    lr: float,
    progress_from: float,
    progress_to: float,
) -> Any:
    import torch

    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    return run_loop(
        ctx,
        name=name,
        fingerprint=fingerprint,
        model=student,
        optimizer=optimizer,
        n_items=len(texts),
        batch_size=batch_size,
        epochs=epochs,
        loss_fn=lambda idx: distill_loss(task, encoder, student, [texts[i] for i in idx], targets[idx]),
        progress_from=progress_from,
        progress_to=progress_to,
        label=name,
    )


def init_from_teacher(student: Any, teacher: Any, layers: list[int]) -> int:
    """Copy the teacher's embeddings, the chosen layers (student layer i <- teacher layer layers[i]) and heads;
    returns how many tensors did not fit (and start random)."""
    source = teacher.state_dict()
    own = student.state_dict()
    skipped = 0
    for key in own:
        src = key
        marker = "encoder.layer."
        if marker in key:
            head, rest = key.split(marker, 1)
            index, tail = rest.split(".", 1)
            src = f"{head}{marker}{layers[int(index)]}.{tail}"
        if src in source and source[src].shape == own[key].shape:
            own[key] = source[src].clone()
        else:
            skipped += 1
    student.load_state_dict(own)
    return skipped


def save_checkpoint(model: Any, source: Path, out: Path, hidden: int | None = None) -> None:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        # a classifier made from an embeddings model keeps only the tokenizer (no pooling config)
        copy_side_files(source, tmp, sentence_transformers=not hasattr(model, "classifier"))
        if hidden is not None:
            set_pooling_width(tmp, hidden)

    write_output(out, write)


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
    import torch

    started = time.perf_counter()
    check_training(texts, epochs, batch_size, lr, max_length)
    check_fraction("held_out", held_out, 0.0, 0.9)
    shape = parse_student(student)
    teacher = Path(teacher)
    task = detect_task(teacher)
    torch.set_num_threads(max(1, ctx.threads))
    torch.manual_seed(ctx.seed)
    config, same_width = student_config(load_config(teacher), shape, task == Task.EMBEDDINGS)
    tokenizer = load_tokenizer(teacher)
    encoder = Encoder(tokenizer, max_length, pooling_of(teacher) if task == Task.EMBEDDINGS else "mean")
    train, held = split(texts, held_out, ctx.seed)
    if not train:
        raise ShrinkError("every text would be held out: give more texts or a smaller held_out")

    teacher_model = load_model(teacher, task)
    params_before = parameters(teacher_model)
    targets = teacher_outputs(ctx, "teacher_outputs.pt", teacher_model, encoder, task, train + held, str(teacher))
    train_t, held_t = targets[: len(train)], targets[len(train) :]

    torch.manual_seed(ctx.seed)
    model = from_config(config, task)
    notes = []
    if same_width:
        layers = teacher_layers(teacher_model.config.num_hidden_layers, config.num_hidden_layers)
        skipped = init_from_teacher(model, teacher_model, layers)
        # the teacher's word embeddings stay as they are: most of the student's parameters, and what its
        # layers were trained on; the optimizer then keeps state only for the layers (a third of the time)
        model.get_input_embeddings().weight.requires_grad = False
        notes.append(f"initialised from the teacher: embeddings (kept frozen) and layers {layers}")
        if skipped:
            notes.append(
                f"{skipped} weight tensors of another shape than the teacher's start random (e.g. a narrower FFN)"
            )
    else:
        layers = []
        notes.append(
            f"random initialisation: the student's width ({config.hidden_size}) differs from the teacher's "
            f"({teacher_model.config.hidden_size}), so no teacher weights fit; it needs more data and epochs"
        )
    del teacher_model
    before = encoder.run_all(model, held, task) if held else None

    settings = {
        "student": student,
        "shape": {
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            "ffn": config.intermediate_size,
        },
        "teacher_layers": layers,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "max_length": max_length,
        "held_out": held_out,
        "seed": ctx.seed,
        "loss": "1 - cosine" if task == Task.EMBEDDINGS else f"KL at temperature {TEMPERATURE}",
    }
    fingerprint = {"settings": settings, "texts": texts_digest(texts), "teacher": str(teacher)}
    result = train_student(
        ctx,
        name="distill_state.pt",
        fingerprint=fingerprint,
        task=task,
        encoder=encoder,
        student=model,
        texts=train,
        targets=train_t,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        progress_from=0.15,
        progress_to=0.95,
    )
    if result.resumed_from:
        notes.append(f"resumed at optimizer step {result.resumed_from} of {result.steps}")
    scores: dict[str, float] = {}
    if held:
        after = encoder.run_all(model, held, task)
        scores = quality(task == Task.EMBEDDINGS, after, held_t) | quality(
            task == Task.EMBEDDINGS, before, held_t, "untrained_"
        )
    else:
        notes.append("no held-out texts: quality not measured")
    save_checkpoint(model, teacher, Path(out), config.hidden_size)
    ctx.progress(1.0, "done")
    return StepReport(
        step="distill",
        settings=settings,
        data_sha256=data_sha256,
        examples=len(train),
        held_out=len(held),
        quality=scores,
        params_before=params_before,
        params_after=parameters(model),
        seconds=round(time.perf_counter() - started, 2),
        notes=notes,
    )

"""Fine-tuning: a classification head on an encoder (optionally LoRA adapters merged into the weights),
trained on the operator's labeled examples, with a stratified held-out split and the zero-shot prototype
baseline the agent runs (labels embedded as prototypes, cosine argmax) measured on the same held-out set."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from controller.registry.shrink import ShrinkError, StepContext, StepReport
from controller.registry.shrink.data import check_fraction, stratified_split
from controller.registry.shrink.distillation import save_checkpoint, texts_digest
from controller.registry.shrink.lora import add_adapters, merge_adapters
from controller.registry.shrink.models import Encoder, detect_task, load_model, load_tokenizer, parameters, pooling_of
from controller.registry.shrink.train import run_loop
from wire.manifest import Task

log = logging.getLogger(__name__)

BATCH_SIZE = 16
#: The new head starts from random weights: it learns at this rate at least (the encoder at ``lr``).
HEAD_LR = 1e-3


def prototype_accuracy(encoder: Encoder, model: Any, labels: list[str], held: list[tuple[str, str]]) -> float:
    """The agent's zero-shot classifier (agent.inference.pipelines.embeddings): each label's name embedded
    as its prototype, a text gets the label of the nearest prototype by cosine."""
    prototypes = encoder.run_all(model, labels, Task.EMBEDDINGS)
    vectors = encoder.run_all(model, [t for t, _ in held], Task.EMBEDDINGS)
    best = (vectors @ prototypes.T).argmax(-1).tolist()
    return sum(labels[b] == label for b, (_, label) in zip(best, held, strict=True)) / len(held)


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
    import torch

    started = time.perf_counter()
    if not examples:
        raise ShrinkError('no labeled examples: give a JSON-lines file of {"text": ..., "label": ...}')
    labels = sorted({label for _, label in examples})
    if len(labels) < 2:
        raise ShrinkError(
            f"every example has the label {labels[0]!r}: a classifier needs at least two labels;"
            " add examples of the others"
        )
    if epochs < 1 or not lr > 0 or max_length < 8:
        raise ShrinkError(f"epochs must be >= 1 and lr > 0 (got {epochs}, {lr}), max_length >= 8")
    if lora_rank is not None and lora_rank < 1:
        raise ShrinkError(f"lora_rank must be >= 1 (or none for full fine-tuning), got {lora_rank}")
    check_fraction("held_out", held_out, 0.0, 0.9)
    model = Path(model)
    source_task = detect_task(model)
    torch.set_num_threads(max(1, ctx.threads))
    torch.manual_seed(ctx.seed)
    train, held = stratified_split(examples, held_out, ctx.seed)
    encoder = Encoder(
        load_tokenizer(model), max_length, pooling_of(model) if source_task == Task.EMBEDDINGS else "mean"
    )
    notes = []

    baseline: dict[str, float] = {}
    if held:
        base_model = load_model(model, Task.EMBEDDINGS)
        baseline["baseline_accuracy"] = round(prototype_accuracy(encoder, base_model, labels, held), 5)
        params_before = parameters(base_model)
        del base_model
        notes.append("baseline: zero-shot prototypes (label names embedded, cosine argmax) on the held-out set")
    else:
        params_before = 0
        notes.append("no held-out examples: accuracy not measured")

    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in id2label.items()}
    torch.manual_seed(ctx.seed)
    classifier = load_model(
        model,
        Task.TEXT_CLASSIFICATION,
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
        problem_type="single_label_classification",
    )
    if not params_before:
        params_before = parameters(classifier)
    settings: dict[str, Any] = {
        "labels": labels,
        "epochs": epochs,
        "lr": lr,
        "head_lr": max(lr, HEAD_LR),
        "batch_size": BATCH_SIZE,
        "lora_rank": lora_rank,
        "max_length": max_length,
        "held_out": held_out,
        "seed": ctx.seed,
    }
    if lora_rank:
        classifier, trainable = add_adapters(classifier, lora_rank)
        notes.append(
            f"LoRA rank {lora_rank} on query/value ({trainable} trainable parameters), merged into the weights"
        )
    head = [p for n, p in classifier.named_parameters() if ".classifier." in f".{n}" and p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in classifier.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": lr}, {"params": head, "lr": max(lr, HEAD_LR)}], weight_decay=0.01
    )
    targets = torch.tensor([label2id[label] for _, label in train])

    def loss_fn(idx: list[int]) -> Any:
        logits = classifier(**encoder.batch([train[i][0] for i in idx])).logits
        return torch.nn.functional.cross_entropy(logits, targets[idx])

    result = run_loop(
        ctx,
        name="finetune_state.pt",
        fingerprint={"settings": settings, "data": texts_digest([f"{t}\x00{label}" for t, label in examples])},
        model=classifier,
        optimizer=optimizer,
        n_items=len(train),
        batch_size=BATCH_SIZE,
        epochs=epochs,
        loss_fn=loss_fn,
        progress_from=0.05,
        progress_to=0.95,
        label="finetune",
    )
    if result.resumed_from:
        notes.append(f"resumed at optimizer step {result.resumed_from} of {result.steps}")
    if lora_rank:
        classifier = merge_adapters(classifier)
    scores = dict(baseline)
    if held:
        logits = encoder.run_all(classifier, [t for t, _ in held], Task.TEXT_CLASSIFICATION)
        predicted = logits.argmax(-1).tolist()
        scores["accuracy"] = round(
            sum(id2label[p] == label for p, (_, label) in zip(predicted, held, strict=True)) / len(held), 5
        )
        scores["chance"] = round(max(sum(1 for _, lb in held if lb == label) for label in labels) / len(held), 5)
    save_checkpoint(classifier, model, Path(out))
    ctx.progress(1.0, "done")
    return StepReport(
        step="finetune",
        settings=settings,
        data_sha256=data_sha256,
        examples=len(train),
        held_out=len(held),
        quality=scores,
        params_before=params_before,
        params_after=parameters(classifier),
        seconds=round(time.perf_counter() - started, 2),
        notes=notes,
    )

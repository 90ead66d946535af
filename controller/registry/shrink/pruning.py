"""Structured pruning: whole attention heads and FFN neurons removed (smaller matrices), then optional
recovery distillation from the unpruned model.

Importance is activation-based when texts are given (mean |output| of a head or neuron on a few batches
times the norm of the weights that carry it onward), else the norm of those weights alone. transformers 5
has no ``prune_heads`` and a BERT config has one head count for every layer, so every layer loses the same
number of heads; the heads' width stays in config.json as ``attention_head_size`` (``models.load_model``).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

from controller.registry.shrink import ShrinkError, StepContext, StepReport
from controller.registry.shrink.data import check_fraction, split
from controller.registry.shrink.distillation import save_checkpoint, teacher_outputs, texts_digest, train_student
from controller.registry.shrink.models import Encoder, detect_task, load_model, load_tokenizer, parameters, pooling_of
from controller.registry.shrink.report import quality
from wire.manifest import Task

log = logging.getLogger(__name__)

#: Texts the activation-based importance looks at.
IMPORTANCE_TEXTS = 128


def _layers(model: Any) -> list[Any]:
    base = getattr(model, model.base_model_prefix, model)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not hasattr(layers[0], "attention") or not hasattr(layers[0], "intermediate"):
        raise ShrinkError(f"pruning handles BERT-family encoders; this is a {model.config.model_type!r} model")
    return list(layers)


def importance(model: Any, encoder: Encoder | None, texts: list[str]) -> tuple[list[Any], list[Any]]:
    """Per layer: a score per head and a score per FFN neuron (higher = keep)."""
    import torch

    layers = _layers(model)
    heads = model.config.num_attention_heads
    size = layers[0].attention.self.attention_head_size
    ctx_abs: list[Any] = [torch.zeros(heads * size) for _ in layers]
    ffn_abs: list[Any] = [torch.zeros(layer.output.dense.in_features) for layer in layers]
    hooks = []
    if encoder is not None and texts:
        for i, layer in enumerate(layers):

            def ctx_hook(_m: Any, args: Any, i: int = i) -> None:
                ctx_abs[i] += args[0].detach().abs().flatten(0, -2).mean(0)

            def ffn_hook(_m: Any, args: Any, i: int = i) -> None:
                ffn_abs[i] += args[0].detach().abs().flatten(0, -2).mean(0)

            hooks.append(layer.attention.output.dense.register_forward_pre_hook(ctx_hook))
            hooks.append(layer.output.dense.register_forward_pre_hook(ffn_hook))
        try:
            with torch.no_grad():
                for i in range(0, len(texts), 32):
                    encoder.hidden(model, encoder.batch(texts[i : i + 32]))
        finally:
            for hook in hooks:
                hook.remove()
    head_scores, ffn_scores = [], []
    for i, layer in enumerate(layers):
        w_o = layer.attention.output.dense.weight.detach()  # [hidden, heads*size]
        per_column = w_o.norm(dim=0)
        if hooks:
            per_column = per_column * ctx_abs[i]
        head_scores.append(per_column.view(heads, size).norm(dim=1))
        w_out = layer.output.dense.weight.detach()  # [hidden, ffn]
        score = w_out.norm(dim=0)
        ffn_scores.append(score * ffn_abs[i] if hooks else score)
    return head_scores, ffn_scores


def _narrow(linear: Any, keep: Any, dim: int) -> Any:
    """A copy of ``linear`` keeping only ``keep`` along ``dim`` (0: output rows, 1: input columns)."""
    import torch

    weight = linear.weight.detach().index_select(dim, keep).clone()
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    if dim == 0 and bias is not None:
        bias = bias.index_select(0, keep).clone()
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def apply_pruning(
    model: Any, head_scores: list[Any], ffn_scores: list[Any], heads: float, ffn: float
) -> dict[str, int]:
    """Remove the lowest-scoring heads (same number per layer) and FFN neurons in place."""
    import torch

    layers = _layers(model)
    n_heads = model.config.num_attention_heads
    size = layers[0].attention.self.attention_head_size
    drop_heads = min(n_heads - 1, round(heads * n_heads))
    n_ffn = layers[0].output.dense.in_features
    drop_ffn = min(n_ffn - 1, round(ffn * n_ffn))
    keep_heads, keep_ffn = n_heads - drop_heads, n_ffn - drop_ffn
    for layer, hs, fs in zip(layers, head_scores, ffn_scores, strict=True):
        if drop_heads:
            kept = torch.sort(torch.topk(hs, keep_heads).indices).values
            cols = torch.cat([torch.arange(h * size, (h + 1) * size) for h in kept.tolist()])
            attn = layer.attention.self
            for name in ("query", "key", "value"):
                setattr(attn, name, _narrow(getattr(attn, name), cols, 0))
            attn.num_attention_heads = keep_heads
            attn.all_head_size = keep_heads * size
            layer.attention.output.dense = _narrow(layer.attention.output.dense, cols, 1)
        if drop_ffn:
            kept = torch.sort(torch.topk(fs, keep_ffn).indices).values
            layer.intermediate.dense = _narrow(layer.intermediate.dense, kept, 0)
            layer.output.dense = _narrow(layer.output.dense, kept, 1)
    if drop_heads:
        model.config.num_attention_heads = keep_heads
        model.config.attention_head_size = size
    model.config.intermediate_size = keep_ffn
    return {
        "heads_per_layer": keep_heads,
        "heads_removed_per_layer": drop_heads,
        "ffn": keep_ffn,
        "ffn_removed": drop_ffn,
    }


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
    import torch

    started = time.perf_counter()
    heads = check_fraction("heads", heads)
    ffn = check_fraction("ffn", ffn)
    if heads == 0 and ffn == 0:
        raise ShrinkError("nothing to prune: give heads and/or ffn as a fraction above 0 (e.g. 0.5)")
    check_fraction("held_out", held_out, 0.0, 0.9)
    if recover_epochs < 0:
        raise ShrinkError(f"recover_epochs must be >= 0, got {recover_epochs}")
    texts = [t for t in (recover_texts or []) if t.strip()]
    if recover_texts is not None and not texts:
        raise ShrinkError("recover_texts is empty: give texts for the recovery distillation, or none to skip it")
    model = Path(model)
    task = detect_task(model)
    torch.set_num_threads(max(1, ctx.threads))
    torch.manual_seed(ctx.seed)
    original = load_model(model, task)
    if getattr(original.config, "attention_head_size", None) and heads:
        raise ShrinkError("this model's heads were pruned already: prune its FFN only (heads=0), or the parent")
    encoder = Encoder(load_tokenizer(model), max_length, pooling_of(model) if task == Task.EMBEDDINGS else "mean")
    train, held = split(texts, held_out, ctx.seed) if texts else ([], [])
    params_before = parameters(original)
    notes = []

    head_scores, ffn_scores = importance(original, encoder, train[:IMPORTANCE_TEXTS])
    notes.append(
        f"importance: activations on {min(len(train), IMPORTANCE_TEXTS)} texts x weight norms"
        if train
        else "importance: weight norms (no texts given)"
    )
    pruned = copy.deepcopy(original)
    removed = apply_pruning(pruned, head_scores, ffn_scores, heads, ffn)
    settings = {
        "heads": heads,
        "ffn": ffn,
        **removed,
        "recover_epochs": recover_epochs if train else 0,
        "max_length": max_length,
        "held_out": held_out,
        "seed": ctx.seed,
        "lr": 5e-5,
        "batch_size": 32,
    }
    scores: dict[str, float] = {}
    if texts:
        targets = teacher_outputs(ctx, "teacher_outputs.pt", original, encoder, task, train + held, str(model))
        train_t, held_t = targets[: len(train)], targets[len(train) :]
        embeddings = task == Task.EMBEDDINGS
        if held:
            scores |= quality(embeddings, encoder.run_all(pruned, held, task), held_t, "before_recovery_")
        if recover_epochs and train:
            result = train_student(
                ctx,
                name="recover_state.pt",
                fingerprint={"settings": settings, "texts": texts_digest(texts), "model": str(model)},
                task=task,
                encoder=encoder,
                student=pruned,
                texts=train,
                targets=train_t,
                epochs=recover_epochs,
                batch_size=32,
                lr=5e-5,
                progress_from=0.15,
                progress_to=0.95,
            )
            if result.resumed_from:
                notes.append(f"resumed at optimizer step {result.resumed_from} of {result.steps}")
        if held:
            scores |= quality(embeddings, encoder.run_all(pruned, held, task), held_t)
            # the contract's names: *_before_recovery
            scores = {
                (k.removeprefix("before_recovery_") + "_before_recovery" if k.startswith("before_") else k): v
                for k, v in scores.items()
            }
    else:
        notes.append("no texts: no recovery and no quality figures")
    save_checkpoint(pruned, model, Path(out))
    ctx.progress(1.0, "done")
    return StepReport(
        step="prune",
        settings=settings,
        data_sha256=data_sha256,
        examples=len(train),
        held_out=len(held),
        quality=scores,
        params_before=params_before,
        params_after=parameters(pruned),
        seconds=round(time.perf_counter() - started, 2),
        notes=notes,
    )

"""Student shapes: the seed sizes of Google's BERT miniatures, or explicit layers/hidden/heads/ffn."""

from __future__ import annotations

from typing import Any

from controller.registry.shrink import ShrinkError

#: Google's BERT miniatures (Turc et al. 2019): layers L, hidden H, heads H/64, FFN 4H.
SEED_SHAPES: dict[str, dict[str, int]] = {
    "bert-tiny": {"layers": 2, "hidden": 128, "heads": 2, "ffn": 512},
    "bert-mini": {"layers": 4, "hidden": 256, "heads": 4, "ffn": 1024},
    "bert-small": {"layers": 4, "hidden": 512, "heads": 8, "ffn": 2048},
}
_KEYS = ("layers", "hidden", "heads", "ffn")


def parse_student(spec: str) -> dict[str, int]:
    """'bert-tiny' | 'bert-mini' | 'bert-small' | 'layers=3' | 'layers=3,hidden=256,heads=4,ffn=1024' -> shape.

    Shapes without hidden keep the teacher's hidden size (and initialise from the teacher's layers)."""
    text = (spec or "").strip().lower()
    if text in SEED_SHAPES:
        return dict(SEED_SHAPES[text])
    shape: dict[str, int] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip()
        if not sep or key not in _KEYS:
            raise ShrinkError(
                f"unknown student shape {spec!r}: use {', '.join(SEED_SHAPES)}, or key=value pairs of "
                f"{', '.join(_KEYS)} such as 'layers=3' or 'layers=4,hidden=256,heads=4,ffn=1024'"
            )
        try:
            number = int(value)
        except ValueError:
            raise ShrinkError(f"student shape {spec!r}: {key} must be a whole number, got {value!r}") from None
        if number < 1:
            raise ShrinkError(f"student shape {spec!r}: {key} must be at least 1")
        shape[key] = number
    if "layers" not in shape:
        raise ShrinkError(f"student shape {spec!r} does not say how many layers: add layers=N")
    return shape


def student_config(teacher: Any, shape: dict[str, int], embeddings: bool = False) -> tuple[Any, bool]:
    """The student's transformers config (same class as the teacher's) and whether it keeps the teacher's
    width (so its weights can start from the teacher's). An embeddings student must keep it: its vectors
    are compared with, and served in place of, the teacher's."""
    for attr in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
        if not hasattr(teacher, attr):
            raise ShrinkError(
                f"the teacher is a {teacher.model_type!r} model; distillation handles BERT-family configs "
                "(num_hidden_layers, hidden_size, num_attention_heads, intermediate_size)"
            )
    if getattr(teacher, "attention_head_size", None):
        raise ShrinkError("the teacher has pruned attention heads: distil from the unpruned model")
    hidden = shape.get("hidden", teacher.hidden_size)
    same_width = hidden == teacher.hidden_size
    heads = shape.get("heads", teacher.num_attention_heads if same_width else max(1, hidden // 64))
    ffn = shape.get("ffn", teacher.intermediate_size if same_width else 4 * hidden)
    if embeddings and not same_width:
        raise ShrinkError(
            f"an embeddings student must keep the teacher's hidden size ({teacher.hidden_size}, not {hidden}): its "
            "vectors replace the teacher's, so they must have the same width; shrink it by layers (and heads, ffn), "
            "e.g. 'layers=2' or 'layers=3,ffn=768'"
        )
    if hidden % heads:
        raise ShrinkError(f"student hidden size {hidden} is not a multiple of its {heads} heads: change heads")
    if shape["layers"] > teacher.num_hidden_layers and same_width:
        raise ShrinkError(
            f"the student ({shape['layers']} layers) would be deeper than the teacher ({teacher.num_hidden_layers})"
        )
    values = teacher.to_dict()
    values.update(
        num_hidden_layers=shape["layers"], hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn
    )
    values.pop("_name_or_path", None)
    config = type(teacher).from_dict(values)
    return config, same_width


def teacher_layers(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers for the student (DistilBERT takes every other one), always keeping the last."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]

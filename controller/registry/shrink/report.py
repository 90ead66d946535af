"""Quality figures for the step reports."""

from __future__ import annotations

from typing import Any


def cosine_stats(a: Any, b: Any, prefix: str = "") -> dict[str, float]:
    """Mean and 5th percentile of the row-wise cosine between two batches of vectors."""
    import torch

    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    if cos.numel() == 0:
        return {}
    return {
        f"{prefix}cosine_mean": round(float(cos.mean()), 5),
        f"{prefix}cosine_p5": round(float(torch.quantile(cos, 0.05)), 5),
    }


def agreement(a: Any, b: Any, prefix: str = "") -> dict[str, float]:
    """Top-1 agreement of two batches of logits."""
    if a.numel() == 0:
        return {}
    return {f"{prefix}agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 5)}


def quality(task_is_embeddings: bool, student: Any, teacher: Any, prefix: str = "") -> dict[str, float]:
    return cosine_stats(student, teacher, prefix) if task_is_embeddings else agreement(student, teacher, prefix)

"""LoRA adapters (Hu et al. 2021) with peft on a model's attention projections, merged into the weights at the
end, so the checkpoint left behind is a plain transformers one and nothing downstream knows adapters were used."""

from __future__ import annotations

from typing import Any

#: Linear layers that get adapters (BERT names): the attention's query and value projections.
TARGETS = ["query", "value"]


def add_adapters(model: Any, rank: int) -> tuple[Any, int]:
    """The model wrapped with rank-``rank`` adapters (alpha 2 x rank, the encoder frozen, the classification
    head trained in full) and its number of trainable parameters."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, task_type=TaskType.SEQ_CLS
    )
    wrapped = get_peft_model(model, config)
    return wrapped, sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def merge_adapters(wrapped: Any) -> Any:
    """The plain model with every adapter folded into its base weight (W += B A x alpha / r)."""
    merged = wrapped.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad = True
    return merged

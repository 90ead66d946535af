"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's attention projections, merged into the weights.

Hand-written (a few lines) rather than peft: peft is not in the convert extra, and a merged adapter leaves
a plain checkpoint behind, so nothing downstream needs to know it was used.
"""

from __future__ import annotations

from typing import Any

#: Linear layers that get adapters (BERT names): the attention's query and value projections.
TARGETS = ("query", "value")


def _lora_class() -> type:
    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
            super().__init__()
            self.base = base
            self.scale = alpha / rank
            self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) / rank**0.5 * 0.01)
            self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale

        def merged(self) -> torch.nn.Linear:
            with torch.no_grad():
                self.base.weight += (self.b @ self.a) * self.scale
            return self.base

    return LoRALinear


def add_adapters(model: Any, rank: int, alpha: float | None = None) -> int:
    """Freeze the encoder, wrap TARGETS in adapters; the classification head stays trainable. Returns the
    number of trainable parameters."""
    lora = _lora_class()
    for p in model.parameters():
        p.requires_grad = False
    for module in list(model.modules()):
        for name in TARGETS:
            child = getattr(module, name, None)
            if child is not None and type(child).__name__ == "Linear":
                setattr(module, name, lora(child, rank, float(alpha or 2 * rank)))
    head = getattr(model, "classifier", None)
    if head is not None:
        for p in head.parameters():
            p.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_adapters(model: Any) -> None:
    """Fold every adapter into its base weight (W += B A * scale) and put the plain Linear back."""
    lora = _lora_class()
    for module in list(model.modules()):
        for name in TARGETS:
            child = getattr(module, name, None)
            if child is not None and type(child).__name__ == lora.__name__:
                setattr(module, name, child.merged())
    for p in model.parameters():
        p.requires_grad = True

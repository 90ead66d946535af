"""A tiny BERT checkpoint (sentence-transformers layout) and labeled sentences for the shrink tests."""

from __future__ import annotations

import json
from pathlib import Path

from controller.registry.shrink import StepContext

#: Topic words: a sentence's label is the topic whose words it uses (a separable labeled set).
TOPICS = {
    "weather": ["rain", "sunny", "cloudy", "storm", "wind", "snow", "cold", "warm"],
    "machines": ["pump", "valve", "motor", "engine", "fan", "sensor", "battery", "gateway"],
    "food": ["bread", "cheese", "apple", "soup", "coffee", "honey", "rice", "cake"],
}
FILLER = ["the", "a", "was", "is", "very", "today", "again", "and", "this", "morning", "still", "quite"]


def sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    import random

    rng = random.Random(seed)
    labels = sorted(TOPICS)
    out = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = [rng.choice(TOPICS[label]) for _ in range(2)] + [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def tiny_bert(out: Path, *, layers: int = 4, hidden: int = 64, heads: int = 4, ffn: int = 256, seed: int = 0) -> Path:
    """A random-weight BERT encoder saved like a sentence-transformers model (mean pooling)."""
    import torch
    from transformers import BertConfig, BertModel

    from benchmarks.seeds.encoders import bert_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = bert_tokenizer(vocab_size=1200, seed=seed, max_length=128)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True})
    )
    return out


def context(work_dir: Path, stop_after: int | None = None, seed: int = 0) -> tuple[StepContext, list[float]]:
    """A StepContext recording progress; with ``stop_after`` it asks to cancel after that many progress calls
    past the first 15% (the teacher's outputs)."""
    seen: list[float] = []
    steps = {"n": 0}

    def progress(fraction: float, _message: str) -> None:
        seen.append(fraction)
        if fraction > 0.15:
            steps["n"] += 1

    def cancelled() -> bool:
        return stop_after is not None and steps["n"] >= stop_after

    return StepContext(work_dir=work_dir, progress=progress, cancelled=cancelled, threads=1, seed=seed), seen

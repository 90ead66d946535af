"""Seed models built locally (no hub): real architectures and sizes with random weights, saved as
Hugging Face checkpoint directories with a locally trained tokenizer. Needs the ``convert`` extra.

``build_seed(name, out_dir)`` builds one of ``SEEDS``; encoders live in ``encoders``, decoders and T5
in ``decoders``.
"""

from __future__ import annotations

from pathlib import Path

ENCODER_SEEDS = ("distilbert", "bert-tiny", "bert-mini", "bert-small", "bert-medium", "mobilebert")
DECODER_SEEDS = ("gpt-neo-125m", "gpt-j-small", "phi-small", "llama-small", "t5-small")
SEEDS = ENCODER_SEEDS + DECODER_SEEDS


def build_seed(name: str, out_dir: Path, **options: object) -> Path:
    """Build seed ``name`` into ``out_dir`` (a checkpoint directory) and return it."""
    if name in ENCODER_SEEDS:
        from benchmarks.seeds.encoders import build_encoder_seed

        return build_encoder_seed(name, out_dir, **options)
    if name in DECODER_SEEDS:
        from benchmarks.seeds.decoders import build_decoder_seed

        return build_decoder_seed(name, out_dir, **options)
    raise ValueError(f"unknown seed {name!r}; choose one of {', '.join(SEEDS)}")

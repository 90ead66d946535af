"""Varied English sentences and prompts for evaluation sets supplied with an import (``options.eval_set``).

The registry generates an evaluation set from a tokenizer's vocabulary when none is supplied: enough to
compare random-weight seeds with their quantized variants, but word salad for a model with real weights
(MiniLM), whose agreement should be measured on text like what it will see. Deterministic, no randomness.
"""

from __future__ import annotations

from typing import Any

from controller.registry.convert.evaluate_encoders import NATURAL_SENTENCES

_SUBJECTS = (
    "The engineer", "My neighbour", "A small startup", "The city council", "Our football team", "The old farmer",
    "A young doctor", "The weather service", "My grandmother", "The delivery driver", "The night nurse",
    "A famous chef", "The museum guide", "Our landlord", "The school principal",
)  # fmt: skip
_VERBS = (
    "bought", "repaired", "cancelled", "praised", "criticised", "visited", "painted", "sold", "photographed",
    "ignored", "borrowed", "described", "recommended", "inspected",
)  # fmt: skip
_OBJECTS = (
    "a red bicycle", "the broken heating system", "three tickets to the concert", "the new stadium",
    "a cheap laptop", "the village bakery", "an electric car", "the annual budget", "a wooden boat",
    "the hospital's parking lot", "a jar of honey", "the train timetable", "an old violin",
)  # fmt: skip
_TAILS = (
    "yesterday.", "after a long discussion.", "because the price was right.", "in the pouring rain.",
    "without telling anyone.", "before the holidays began.", "for the third time this year.",
    "and everyone was surprised.", "while the children watched.", "on a quiet Sunday morning.",
)  # fmt: skip
_QUESTIONS = (
    "Where can I find a good pharmacy near the station?",
    "How long does it take to bake sourdough bread?",
    "Is the museum open on Sunday afternoons?",
    "What is the fastest way to learn a new language?",
    "Why do cats sleep so much during the day?",
    "When will the next software update be released?",
    "Which river flows through the capital?",
    "Can you recommend a book about the history of mathematics?",
)


def varied_sentences(n: int) -> list[str]:
    """``n`` distinct sentences of 1 to ~40 words: questions, device-log style lines (the evaluator's own
    natural sentences), then subject-verb-object sentences walked through four lists, some followed by a
    question to make longer texts."""
    out = list(dict.fromkeys((*_QUESTIONS, *NATURAL_SENTENCES)))
    seen = set(out)
    i = 0
    while len(out) < n:
        # Strides coprime with the list lengths: every combination comes before any repeats.
        parts = (
            _SUBJECTS[i % len(_SUBJECTS)],
            _VERBS[(i * 3 + i // len(_SUBJECTS)) % len(_VERBS)],
            _OBJECTS[(i * 5 + i // len(_VERBS)) % len(_OBJECTS)],
            _TAILS[(i * 7) % len(_TAILS)],
        )
        sentence = " ".join(parts)
        if i % 9 == 4:
            sentence += " " + _QUESTIONS[i % len(_QUESTIONS)]
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
        i += 1
    return out[:n]


def text_records(n: int) -> list[dict[str, Any]]:
    """``n`` records ``{"text": ...}`` for classification, embeddings (and text2text) evaluation."""
    return [{"text": s} for s in varied_sentences(n)]


def prompt_records(n: int, key: str = "prompt", max_new_tokens: int = 16) -> list[dict[str, Any]]:
    """``n`` generation records: prompts of 1 to 20 words (``key``: "prompt", or "text" for text2text), each
    capped at ``max_new_tokens``."""
    records = []
    for i, sentence in enumerate(varied_sentences(n)):
        words = sentence.split()
        records.append({key: " ".join(words[: 1 + (i * 5) % 20]), "max_new_tokens": max_new_tokens})
    return records

"""What a model folder's own configuration files say: limits, special token ids, labels, the architecture.

Read from the files Hugging Face tools write beside an export (``config.json``, ``generation_config.json``,
``tokenizer_config.json``, ``special_tokens_map.json``, sentence-transformers' ``sentence_bert_config.json``,
onnxruntime-genai's ``genai_config.json``), with ints and lists accepted as they come (``"eos_token_id": 0``
and ``[0, 2]`` both mean a list of ids). Every value says where it came from, so the import can tell the
operator what it read instead of asking.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: config.json keys that bound the sequence a model takes, by family (BERT, GPT-2, GPT-Neo/J, MPT, ...)
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
#: tokenizer_config.json's "no limit" placeholder (transformers' VERY_LARGE_INTEGER) and anything like it
_UNBOUNDED = 10**9


class ConfigError(Exception):
    """A configuration file is there but unreadable; the message names it and says why."""


def read_json(root: Path, name: str) -> dict[str, Any]:
    """``root/name`` as a JSON object, ``{}`` when absent; ConfigError when it is not a JSON object."""
    path = root / name
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must hold a JSON object, it holds a {type(data).__name__}")
    return data


def id_list(value: Any) -> list[int]:
    """Token ids as Hugging Face writes them: an int, a list of ints, or null."""
    if value is None:
        return []
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def one_id(value: Any) -> int | None:
    ids = id_list(value)
    return ids[0] if ids else None


@dataclass
class Found:
    """A value read from the model's files and the file (and key) it came from."""

    value: Any
    source: str


@dataclass
class ModelConfig:
    """Everything the import reads from a folder's configuration files."""

    architectures: list[str] = field(default_factory=list)
    model_type: str = ""
    is_encoder_decoder: bool = False
    context: Found | None = None
    eos_token_id: Found | None = None
    bos_token_id: Found | None = None
    pad_token_id: Found | None = None
    decoder_start_token_id: Found | None = None
    max_new_tokens: Found | None = None
    labels: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        """One line per value read, for the import's log and message."""
        out = []
        for name in ("context", "eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id"):
            found = getattr(self, name)
            if found is not None:
                out.append(f"{name} {found.value} ({found.source})")
        return out


def _token_id(root: Path, token: Any) -> int | None:
    """The id of a special token named in tokenizer_config.json (a string or an AddedToken dict)."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str) or not (root / "tokenizer.json").is_file():
        return None
    try:
        from tokenizers import Tokenizer

        tok_id = Tokenizer.from_file(str(root / "tokenizer.json")).token_to_id(token)
    except Exception:  # a tokenizer the library cannot load is reported where it is used
        return None
    return int(tok_id) if tok_id is not None else None


def read_model_config(root: Path) -> ModelConfig:
    """What ``root``'s configuration files say (missing files are fine; broken ones raise ConfigError)."""
    config = read_json(root, "config.json")
    generation = read_json(root, "generation_config.json")
    tokenizer = read_json(root, "tokenizer_config.json")
    special = read_json(root, "special_tokens_map.json")
    sbert = read_json(root, "sentence_bert_config.json")
    nested = config.get("text_config")
    text_config: dict[str, Any] = nested if isinstance(nested, dict) else {}
    out = ModelConfig(
        architectures=[a for a in config.get("architectures") or [] if isinstance(a, str)],
        model_type=str(config.get("model_type") or ""),
        is_encoder_decoder=bool(config.get("is_encoder_decoder", False)),
    )

    # The sequence limit: the smallest of the position table, the tokenizer's limit and sentence-transformers'
    # max_seq_length (each is a limit of its own: a RoBERTa has 514 positions and a 512-token tokenizer).
    limits: list[Found] = []
    for source, data in (("config.json", config), ("config.json text_config", text_config)):
        for key in _POSITION_KEYS:
            value = data.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                limits.append(Found(value, f"{source} {key}"))
                break
    value = tokenizer.get("model_max_length")
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < _UNBOUNDED:
        limits.append(Found(int(value), "tokenizer_config.json model_max_length"))
    value = sbert.get("max_seq_length")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        limits.append(Found(value, "sentence_bert_config.json max_seq_length"))
    if limits:
        out.context = min(limits, key=lambda f: int(f.value))

    # Special ids: generation_config.json first (what generate() uses), then config.json, then the tokens
    # tokenizer_config.json / special_tokens_map.json name.
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id"):
        for source, data in (("generation_config.json", generation), ("config.json", config)):
            if data.get(name) is not None and id_list(data.get(name)):
                ids = id_list(data[name])
                setattr(out, name, Found(ids if name == "eos_token_id" else ids[0], f"{source} {name}"))
                break
        else:
            token_key = name.removesuffix("_id")
            for source, data in (("tokenizer_config.json", tokenizer), ("special_tokens_map.json", special)):
                token_id = _token_id(root, data.get(token_key)) if token_key in data else None
                if token_id is not None:
                    value = [token_id] if name == "eos_token_id" else token_id
                    setattr(out, name, Found(value, f"{source} {token_key}"))
                    break
    value = generation.get("max_new_tokens")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        out.max_new_tokens = Found(value, "generation_config.json max_new_tokens")

    id2label = config.get("id2label")
    if isinstance(id2label, dict):
        try:
            out.labels = [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]
        except (TypeError, ValueError):
            out.labels = []
    return out


#: config.json architecture suffixes and the task they mean
_ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text"),
)


def task_from_architectures(config: ModelConfig) -> tuple[str, str] | None:
    """(task, reason) from config.json's ``architectures``, or None when they do not say."""
    for arch in config.architectures:
        for suffix, task in _ARCHITECTURE_TASKS:
            if arch.endswith(suffix):
                if task == "text2text" and not config.is_encoder_decoder:
                    continue
                return task, f"config.json architectures {arch}"
        if arch.endswith("Model") and not arch.endswith("PreTrainedModel"):
            return "embeddings", f"config.json architectures {arch} (a bare encoder: its hidden states are embeddings)"
    return None

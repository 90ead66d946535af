"""Loading, running and saving the BERT-family checkpoints the steps work on (torch imported lazily).

A pruned checkpoint keeps its heads' width in config.json (``attention_head_size``), which stock BERT code
does not read (transformers 5 no longer has ``prune_heads``); ``load_model`` builds such a model from its
config, narrows the attention matrices, then loads the weights. The exporter loads checkpoints through it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from controller.registry.shrink import ShrinkError
from wire.manifest import Task

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
#: Files copied from the input checkpoint: tokenizer, sentence-transformers layout.
SIDE_FILES = (
    *TOKENIZER_FILES,
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
SIDE_DIRS = ("1_Pooling", "2_Normalize")


def detect_task(path: Path) -> Task:
    """Embeddings or text-classification, as the importer decides it from config.json's architectures."""
    from controller.registry.hfconfig import ConfigError, read_model_config, task_from_architectures

    if not (Path(path) / "config.json").is_file():
        raise ShrinkError(f"{path} has no config.json: give a Hugging Face checkpoint directory")
    try:
        found = task_from_architectures(read_model_config(Path(path)))
    except ConfigError as exc:
        raise ShrinkError(str(exc)) from None
    if found is None or found[0] not in (Task.EMBEDDINGS.value, Task.TEXT_CLASSIFICATION.value):
        raise ShrinkError(f"{path} is not an encoder for embeddings or text classification ({found})")
    return Task(found[0])


def load_config(path: Path) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ShrinkError(f"{path}/config.json cannot be read by transformers: {exc}") from None


def model_class(task: Task) -> Any:
    from transformers import AutoModel, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == Task.TEXT_CLASSIFICATION else AutoModel


def narrow_heads(model: Any, config: Any) -> None:
    """Give every self-attention module ``config.num_attention_heads`` heads of ``config.attention_head_size``."""
    import torch

    size = int(config.attention_head_size)
    heads = int(config.num_attention_heads)
    for module in model.modules():
        if hasattr(module, "attention_head_size") and hasattr(module, "query"):
            width = heads * size
            for name in ("query", "key", "value"):
                old = getattr(module, name)
                setattr(module, name, torch.nn.Linear(old.in_features, width))
            module.num_attention_heads = heads
            module.attention_head_size = size
            module.all_head_size = width
            module.scaling = size**-0.5
        if type(module).__name__.endswith("SelfOutput") and hasattr(module, "dense"):
            old = module.dense
            module.dense = torch.nn.Linear(heads * size, old.out_features)


def from_config(config: Any, task: Task) -> Any:
    """A fresh model for ``config`` (heads narrowed when the config says so), weights from the torch seed."""
    model = model_class(task).from_config(config, attn_implementation="eager")
    if getattr(config, "attention_head_size", None):
        narrow_heads(model, config)
        model.apply(model._init_weights)
    return model


def load_model(path: Path, task: Task, **overrides: Any) -> Any:
    """The checkpoint's model in eval mode, from local files only; overrides go to the config (e.g. labels)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_config(path)
    for key, value in overrides.items():
        setattr(config, key, value)
    if getattr(config, "attention_head_size", None):
        from safetensors.torch import load_file

        weights = Path(path) / "model.safetensors"
        if not weights.is_file():
            raise ShrinkError(f"{path}: a pruned checkpoint needs model.safetensors")
        model = from_config(config, task)
        state = load_file(str(weights))
        prefix = model.base_model_prefix
        if not any(k.startswith(prefix + ".") for k in model.state_dict()):
            state = {k.removeprefix(prefix + "."): v for k, v in state.items()}
        elif not any(k.startswith(prefix + ".") for k in state):
            state = {f"{prefix}.{k}": v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        # a new head starts random; a head the encoder alone does not use is left out
        missing = [k for k in missing if "position_ids" not in k and not k.startswith("classifier")]
        unexpected = [k for k in unexpected if not k.startswith("classifier")]
        if missing or unexpected:
            raise ShrinkError(
                f"{path}: weights do not fit the pruned config (missing {missing[:3]}, extra {unexpected[:3]})"
            )
    else:
        try:
            model = model_class(task).from_pretrained(
                path,
                config=config,
                local_files_only=True,
                attn_implementation="eager",
                # a new label set replaces the classifier head
                ignore_mismatched_sizes="num_labels" in overrides,
            )
        except Exception as exc:
            raise ShrinkError(f"{path}: transformers cannot load the checkpoint: {exc}") from None
    model.eval()
    return model


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        raise ShrinkError(f"{path} has no tokenizer.json: save a fast tokenizer into the checkpoint")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def pooling_of(path: Path) -> str:
    from controller.registry.convert import ConversionError
    from controller.registry.convert.hf_encoders import _checkpoint_pooling

    try:
        return _checkpoint_pooling(Path(path))
    except ConversionError as exc:
        raise ShrinkError(str(exc)) from None


class Encoder:
    """Tokenizes texts and runs a model: sentence vectors (pooled, L2-normalised) or logits."""

    def __init__(self, tokenizer: Any, max_length: int, pooling: str = "mean") -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pooling = pooling

    def batch(self, texts: list[str]) -> dict[str, Any]:
        return dict(
            self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )

    def hidden(self, model: Any, feeds: dict[str, Any]) -> Any:
        base = getattr(model, model.base_model_prefix, model)
        return base(**feeds).last_hidden_state

    def vectors(self, model: Any, feeds: dict[str, Any], normalize: bool = True) -> Any:
        import torch

        hidden = self.hidden(model, feeds)
        mask = feeds["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = (hidden - (1.0 - mask) * 1e9).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled

    def outputs(self, model: Any, texts: list[str], task: Task) -> Any:
        feeds = self.batch(texts)
        if task == Task.EMBEDDINGS:
            return self.vectors(model, feeds)
        return model(**feeds).logits

    def run_all(self, model: Any, texts: list[str], task: Task, batch_size: int = 64) -> Any:
        import torch

        with torch.no_grad():
            parts = [self.outputs(model, texts[i : i + batch_size], task) for i in range(0, len(texts), batch_size)]
        return torch.cat(parts) if parts else torch.empty(0)


def parameters(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def copy_side_files(src: Path, dst: Path, sentence_transformers: bool = True) -> None:
    """Tokenizer (and, for an embeddings model, sentence-transformers) files from ``src`` into ``dst``."""
    for name in SIDE_FILES if sentence_transformers else TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
    for name in SIDE_DIRS if sentence_transformers else ():
        if (Path(src) / name).is_dir():
            shutil.copytree(Path(src) / name, Path(dst) / name, dirs_exist_ok=True)


def set_pooling_width(dst: Path, hidden: int) -> None:
    """Keep ``1_Pooling/config.json``'s embedding width true after the hidden size changed."""
    import json

    path = Path(dst) / "1_Pooling" / "config.json"
    if path.is_file():
        data = json.loads(path.read_text())
        data["word_embedding_dimension"] = hidden
        path.write_text(json.dumps(data, indent=2))

"""Export a local Hugging Face decoder checkpoint (text generation) to an ONNX bundle with a KV cache.

Two runtimes (``RunSpec.runtime``):

* ``onnxruntime-genai``: onnxruntime-genai's model builder writes its model folder (``model.onnx`` +
  ``model.onnx.data``, ``genai_config.json``, tokenizer files). It fuses attention and rotary
  embeddings into ``GroupQueryAttention`` and is the field's runtime for Llama-, Phi-, Mistral-,
  Qwen-style models. The graph keeps the ``decoder.onnx`` contract too (``input_ids``,
  ``attention_mask``, ``past_key_values.{i}.key|value`` -> ``logits``, ``present.{i}.key|value``), so
  the agent's own loop can run it as well.
* ``onnxruntime``: for architectures the builder lacks (GPT-Neo, GPT-J, ...), one ``decoder.onnx``
  traced here from the transformers model with an explicit cache: inputs ``input_ids``,
  ``attention_mask [batch, past + sequence]``, ``position_ids`` and ``past_key_values.{i}.key|value
  [batch, kv_heads, past, head_dim]``; outputs ``logits [batch, sequence, vocab]`` and
  ``present.{i}.key|value``. Batch, sequence and past length are dynamic; the same graph serves the
  prompt (past length 0) and every decoding step, so the weights are stored once (transformers'
  own exporter writes a prefill and a decode graph, each with all the weights).

Tied embeddings are untied before the plain export: with a tied ``lm_head`` the graph transposes the
embedding at every step and int8 is no faster than fp32 (GPT-Neo 125M: 78 -> 203 tokens/s after
untying).

Never touches the network: transformers and the builder run with the hub offline.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from controller.registry.convert import ConversionError, ExportedBundle
from wire.manifest import Generation, Preprocess, Quantization, RunSpec, Runtime, Task

log = logging.getLogger(__name__)

DECODER_FILE = "decoder.onnx"
GENAI_MODEL_FILE = "model.onnx"
GENAI_CONFIG_FILE = "genai_config.json"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_OPSET = 17
DEFAULT_MAX_NEW_TOKENS = 64
#: Architectures onnxruntime-genai's builder turns into its runtime's format (tested here: Llama, Phi).
GENAI_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "PhiForCausalLM",
        "Phi3ForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "GraniteForCausalLM",
        "OlmoForCausalLM",
        "SmolLM3ForCausalLM",
    }
)
#: model_type values whose transformers implementation traces with an explicit DynamicCache (tested:
#: gpt_neo, gptj, phi, llama; the others share the same cache and attention code paths).
PLAIN_MODEL_TYPES = frozenset({"gpt_neo", "gptj", "gpt2", "llama", "phi", "mistral", "qwen2", "qwen3", "gemma"})
GENAI_PRECISIONS = ("fp32", "int8", "int4")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def export_decoder(checkpoint_dir: Path, out_dir: Path, **options: Any) -> ExportedBundle:
    """Export the decoder checkpoint in ``checkpoint_dir`` to a text-generation bundle in ``out_dir``.

    Options: ``runtime`` ("auto": onnxruntime-genai where its builder supports the architecture,
    else "onnxruntime"; or either explicitly), ``max_new_tokens`` (default from
    generation_config.json, else 64), ``opset`` (17, plain export), ``precision`` (genai only:
    "fp32", "int8" or "int4"; quantized variants normally come from ``quantize``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    runtime_opt = str(options.pop("runtime", "auto"))
    max_new_opt = options.pop("max_new_tokens", None)
    opset = int(options.pop("opset", DEFAULT_OPSET))
    precision = str(options.pop("precision", "fp32"))
    if options:
        raise ConversionError(f"unknown export options {sorted(options)}")
    ckpt = Path(checkpoint_dir)
    config = check_checkpoint(ckpt)
    architecture = (config.get("architectures") or ["?"])[0]
    runtime = _choose_runtime(runtime_opt, architecture, config.get("model_type", "?"))
    if runtime == Runtime.ONNXRUNTIME_GENAI:
        return build_genai(ckpt, Path(out_dir), precision, max_new_tokens=max_new_opt)
    if precision != "fp32":
        raise ConversionError(
            f"precision {precision!r} is for the onnxruntime-genai builder; quantize plain exports with quantize()"
        )
    return _export_plain(ckpt, Path(out_dir), opset, max_new_opt)


def check_checkpoint(ckpt: Path) -> dict[str, Any]:
    """config.json of a decoder checkpoint directory, after checking weights and tokenizer.json are there."""
    if not ckpt.is_dir():
        raise ConversionError(f"{ckpt} is not a directory: pass a Hugging Face checkpoint directory")
    config = read_json(ckpt / "config.json")
    if not config:
        raise ConversionError(f"{ckpt} has no config.json: it is not a Hugging Face checkpoint directory")
    if not any((ckpt / name).is_file() for name in _WEIGHT_FILES):
        raise ConversionError(f"{ckpt} has no weights ({' or '.join(_WEIGHT_FILES[::2])})")
    if not (ckpt / TOKENIZER_FILE).is_file():
        raise ConversionError(
            f"{ckpt} has no {TOKENIZER_FILE}: the device tokenizes with the tokenizers package only; "
            "save a fast tokenizer into the checkpoint (tokenizer.save_pretrained) and export again"
        )
    if config.get("is_encoder_decoder"):
        raise ConversionError(f"{ckpt} is an encoder-decoder ({config.get('model_type')}): use export_t5 (text2text)")
    return config


def _choose_runtime(requested: str, architecture: str, model_type: str) -> Runtime:
    genai_ok = architecture in GENAI_ARCHITECTURES
    plain_ok = model_type in PLAIN_MODEL_TYPES
    if requested == "auto":
        if genai_ok:
            return Runtime.ONNXRUNTIME_GENAI
        requested = Runtime.ONNXRUNTIME.value
    if requested == Runtime.ONNXRUNTIME_GENAI.value:
        if not genai_ok:
            raise ConversionError(
                f"onnxruntime-genai's builder does not support {architecture}; "
                f"use runtime='onnxruntime' (supported model types: {', '.join(sorted(PLAIN_MODEL_TYPES))})"
            )
        return Runtime.ONNXRUNTIME_GENAI
    if requested == Runtime.ONNXRUNTIME.value:
        if not plain_ok:
            raise ConversionError(
                f"no text-generation export for model type {model_type!r} ({architecture}); supported: "
                f"{', '.join(sorted(PLAIN_MODEL_TYPES))} (plain onnxruntime) and "
                f"{', '.join(sorted(GENAI_ARCHITECTURES))} (onnxruntime-genai)"
            )
        return Runtime.ONNXRUNTIME
    raise ConversionError(f"unknown runtime {requested!r}: use auto, onnxruntime or onnxruntime-genai")


# ---------------------------------------------------------------------------------------------------------
# onnxruntime-genai (model builder)


def build_genai(
    ckpt: Path,
    out: Path,
    precision: str,
    max_new_tokens: Any = None,
    extra_options: dict[str, Any] | None = None,
) -> ExportedBundle:
    """Run onnxruntime-genai's model builder on ``ckpt`` at ``precision`` and describe the folder it writes.

    ``extra_options`` go to the builder's ``--extra_options`` (e.g. ``block_size``, ``accuracy_level``).
    """
    import onnxruntime_genai

    if precision not in GENAI_PRECISIONS:
        raise ConversionError(f"unknown genai precision {precision!r}: use one of {', '.join(GENAI_PRECISIONS)}")
    config = check_checkpoint(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="genai-build-") as scratch:
        source = _builder_input(ckpt, config, Path(scratch) / "checkpoint")
        command = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            *("-i", str(source), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(Path(scratch) / "cache")),
        ]
        if extra_options:
            command += ["--extra_options", *(f"{key}={value}" for key, value in extra_options.items())]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
        # A subprocess: the builder prints progress bars and holds the whole model in memory; its exit
        # frees that memory, and its output goes to the log only when it fails.
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ConversionError(f"onnxruntime-genai's builder failed on {ckpt} ({precision}):\n{tail}")
    seconds = time.perf_counter() - started
    # The builder copies tokenizer files; the device's tokenizer.json must be the checkpoint's own.
    shutil.copyfile(ckpt / TOKENIZER_FILE, out / TOKENIZER_FILE)
    genai_config = read_json(out / GENAI_CONFIG_FILE)
    spec = RunSpec(
        task=Task.TEXT_GENERATION,
        runtime=Runtime.ONNXRUNTIME_GENAI,
        io=graph_io_of(out / GENAI_MODEL_FILE),
        entrypoint=GENAI_MODEL_FILE,
        preprocess=Preprocess(tokenizer=TOKENIZER_FILE, max_length=_context_length(config, genai_config)),
        generation=_genai_generation(ckpt, genai_config, max_new_tokens),
    )
    quantization = Quantization()
    if precision != "fp32":
        quantization = Quantization(
            method="int4-genai" if precision == "int4" else "int8-genai",
            block_size=int((extra_options or {}).get("block_size", 32)),
            tool=f"onnxruntime-genai {onnxruntime_genai.__version__} model builder",
        )
    extra = {
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "source": str(ckpt.name),
        "checkpoint": str(ckpt.resolve()),
        "exporter": f"onnxruntime-genai {onnxruntime_genai.__version__} model builder ({precision})",
        "precision": precision,
        "export_seconds": round(seconds, 3),
    }
    log.info("built %s with onnxruntime-genai (%s) in %s in %.1f s", ckpt.name, precision, out, seconds)
    return ExportedBundle(root=out, spec=spec, quantization=quantization, extra=extra)


def _builder_input(ckpt: Path, config: dict[str, Any], scratch: Path) -> Path:
    """The directory the builder reads: ``ckpt`` itself, or a view of it with a corrected config.json.

    The builder takes every norm's epsilon from ``rms_norm_eps`` and falls back to 1e-6; LayerNorm
    models (Phi: ``layer_norm_eps`` 1e-5) would get the wrong one. Measured on phi-small: logits off by
    1e-2 and greedy tokens differing from torch; with the checkpoint's epsilon they match. The view
    links every file and rewrites config.json only.
    """
    eps = next((config[k] for k in ("layer_norm_eps", "layer_norm_epsilon") if k in config), None)
    if "rms_norm_eps" in config or eps is None:
        return ckpt
    scratch.mkdir(parents=True)
    for item in ckpt.iterdir():
        if item.name != "config.json":
            (scratch / item.name).symlink_to(item.resolve())
    (scratch / "config.json").write_text(json.dumps(dict(config, rms_norm_eps=eps), indent=2))
    log.info("builder input for %s: rms_norm_eps set to the checkpoint's LayerNorm epsilon %s", ckpt.name, eps)
    return scratch


def _genai_generation(ckpt: Path, genai_config: dict[str, Any], max_new_tokens: Any) -> Generation:
    model = genai_config.get("model", {})
    decoder = model.get("decoder", {})
    search = genai_config.get("search", {})
    gen_config = read_json(ckpt / "generation_config.json")
    eos = model.get("eos_token_id")
    return Generation(
        max_new_tokens=int(max_new_tokens or gen_config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        eos_token_id=as_id_list(eos),
        pad_token_id=model.get("pad_token_id"),
        bos_token_id=model.get("bos_token_id"),
        num_layers=int(decoder.get("num_hidden_layers", 0)),
        num_kv_heads=int(decoder.get("num_key_value_heads", 0)),
        head_dim=int(decoder.get("head_size", 0)),
        # Sampling settings come from the checkpoint's generation config, not the builder's defaults
        # (it writes top_k 50 even for greedy checkpoints).
        do_sample=bool(gen_config.get("do_sample", search.get("do_sample", False))),
        temperature=float(gen_config.get("temperature") or 1.0),
        top_k=int(gen_config.get("top_k") or 0) if gen_config.get("do_sample") else 0,
        decoder=decoder.get("filename", GENAI_MODEL_FILE),
    )


def _context_length(config: dict[str, Any], genai_config: dict[str, Any] | None = None) -> int:
    value = (genai_config or {}).get("model", {}).get("context_length")
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = value or config.get(key)
    return int(value or 2048)


# ---------------------------------------------------------------------------------------------------------
# plain onnxruntime (traced here)


def _export_plain(ckpt: Path, out: Path, opset: int, max_new_opt: Any) -> ExportedBundle:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = load_causal_lm(ckpt)
    untied = untie_lm_head(model)
    geometry = cache_geometry(model)
    layers = geometry["num_layers"]
    wrapper = _wrapper_class()(model, layers)
    wrapper.eval()

    input_names, output_names, dynamic_axes = decoder_io_names(layers)
    sample = _sample(model.config, geometry, batch=2, sequence=3, past=5)
    path = out / DECODER_FILE
    with torch.inference_mode(), quiet_tracing():
        # The legacy (TorchScript) exporter traces the cache code paths cleanly and is fast; the graph
        # it writes concatenates past and new keys, so one graph serves every past length (0 included).
        torch.onnx.export(
            wrapper,
            tuple(sample),
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    max_abs_diff = _check_plain_export(path, wrapper, model.config, geometry)
    shutil.copyfile(ckpt / TOKENIZER_FILE, out / TOKENIZER_FILE)
    seconds = time.perf_counter() - started

    config = model.config
    gen_config = read_json(ckpt / "generation_config.json")
    eos = as_id_list(gen_config.get("eos_token_id", config.eos_token_id))
    pad = gen_config.get("pad_token_id", getattr(config, "pad_token_id", None))
    generation = Generation(
        max_new_tokens=int(max_new_opt or gen_config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        eos_token_id=eos,
        # GPT-2-style checkpoints pad with their EOS.
        pad_token_id=pad if pad is not None else (eos[0] if eos else None),
        bos_token_id=gen_config.get("bos_token_id", getattr(config, "bos_token_id", None)),
        num_layers=layers,
        num_kv_heads=geometry["num_kv_heads"],
        head_dim=geometry["head_dim"],
        do_sample=bool(gen_config.get("do_sample", False)),
        temperature=float(gen_config.get("temperature") or 1.0),
        top_k=int(gen_config.get("top_k") or 0) if gen_config.get("do_sample") else 0,
        decoder=DECODER_FILE,
    )
    spec = RunSpec(
        task=Task.TEXT_GENERATION,
        runtime=Runtime.ONNXRUNTIME,
        io=graph_io_of(path),
        entrypoint=DECODER_FILE,
        preprocess=Preprocess(tokenizer=TOKENIZER_FILE, max_length=_context_length(config.to_dict())),
        generation=generation,
    )
    extra = {
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "source": str(ckpt.name),
        "checkpoint": str(ckpt.resolve()),
        "opset": opset,
        "exporter": f"torch.onnx (TorchScript) torch {torch.__version__}, explicit KV cache",
        "untied_lm_head": untied,
        "export_seconds": round(seconds, 3),
        "export_max_abs_diff": max_abs_diff,
    }
    log.info(
        "exported %s (%s) to %s in %.1f s, max |onnx - torch| %.2e",
        ckpt.name,
        config.model_type,
        out,
        seconds,
        max_abs_diff,
    )
    return ExportedBundle(root=out, spec=spec, extra=extra)


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Silence the tracer's warnings about Python values in transformers' cache and mask code: every
    export is checked against torch on other shapes (past 0, past > 0, padding) right after."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        yield


def load_causal_lm(ckpt: Path) -> Any:
    """The checkpoint's causal LM in eval mode, fp32, eager attention (plain MatMul/Softmax in the graph)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            ckpt, local_files_only=True, attn_implementation="eager", dtype="float32"
        )
    except Exception as exc:
        raise ConversionError(f"transformers cannot load {ckpt} as a causal LM: {exc}") from exc
    model.eval()
    return model


def untie_lm_head(model: Any) -> bool:
    """Give ``lm_head`` its own copy of a tied embedding matrix; True if it was tied."""
    import torch

    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    if head is None or head.weight.data_ptr() != embeddings.weight.data_ptr():
        return False
    head.weight = torch.nn.Parameter(embeddings.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return True


def cache_geometry(model: Any) -> dict[str, int]:
    """num_layers, num_kv_heads and head_dim of the model's KV cache, measured from one forward pass."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.zeros((1, 1), dtype=torch.int64), use_cache=True)
    cache = _output_cache(out)
    keys = cache.layers[0].keys
    return {"num_layers": len(cache.layers), "num_kv_heads": int(keys.shape[1]), "head_dim": int(keys.shape[3])}


def decoder_io_names(layers: int) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """Input names, output names and dynamic axes of ``decoder.onnx``."""
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    axes |= {name: {0: "batch", 2: "past_sequence"} for name in past}
    axes |= {name: {0: "batch", 2: "total_sequence"} for name in present}
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present], axes


def _output_cache(out: Any) -> Any:
    # transformers 5 renamed the output's ``past_key_values`` to ``cache``.
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


@functools.cache
def _wrapper_class() -> type:
    """The exported module, defined lazily so importing this module does not import torch."""
    import torch
    from transformers import DynamicCache

    class DecoderWithCache(torch.nn.Module):
        """Flat tensors in and out: (ids, mask, positions, k0, v0, k1, ...) -> (logits, k0', v0', ...)."""

        def __init__(self, model: torch.nn.Module, layers: int) -> None:
            super().__init__()
            self.model = model
            self.layers = layers
            params = inspect.signature(model.forward).parameters
            self.cache_arg = "cache" if "cache" in params else "past_key_values"

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
            # No config: every layer is a full (growing) cache, so each present is past + sequence long
            # and the device's bookkeeping is the same for every architecture (GPT-Neo's local layers
            # mask by window in attention, as in transformers).
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{self.cache_arg: cache},
            )
            flat = [out.logits]
            for layer in _output_cache(out).layers:
                flat += [layer.keys, layer.values]
            return tuple(flat)

    return DecoderWithCache


def _sample(
    config: Any, geometry: dict[str, int], batch: int, sequence: int, past: int, padded: bool = False
) -> list[Any]:
    """Export/check inputs: random ids, a mask (left padding on row 0 if ``padded``), positions, past."""
    import torch

    generator = torch.Generator().manual_seed(batch * 100 + sequence * 10 + past)
    ids = torch.randint(0, config.vocab_size, (batch, sequence), generator=generator, dtype=torch.int64)
    mask = torch.ones(batch, past + sequence, dtype=torch.int64)
    if padded:
        mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    shape = (batch, geometry["num_kv_heads"], past, geometry["head_dim"])
    caches = [torch.randn(shape, generator=generator) for _ in range(2 * geometry["num_layers"])]
    return [ids, mask, positions, *caches]


def _check_plain_export(path: Path, wrapper: Any, config: Any, geometry: dict[str, int]) -> float:
    """Run the graph against torch on prompt, decode and padded shapes; fail if it does not reproduce torch."""
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    for batch, sequence, past, padded in ((1, 6, 0, False), (1, 1, 6, False), (2, 4, 5, True)):
        inputs = _sample(config, geometry, batch, sequence, past, padded)
        with torch.inference_mode():
            reference = wrapper(*inputs)
        got = session.run(None, dict(zip(names, (t.numpy() for t in inputs), strict=True)))
        for want, have in zip(reference, got, strict=True):
            if want.shape != have.shape:
                raise ConversionError(f"the exported graph gives shape {have.shape}, torch {tuple(want.shape)}")
            diff = float(np.max(np.abs(have - want.numpy()))) if have.size else 0.0
            scale = max(1.0, float(np.max(np.abs(want.numpy()))) if have.size else 1.0)
            if not np.isfinite(diff) or diff > 1e-3 * scale:
                raise ConversionError(
                    f"the exported decoder does not reproduce torch (batch {batch}, sequence {sequence}, "
                    f"past {past}): max |diff| {diff:.3g}"
                )
            worst = max(worst, diff)
    return worst


# ---------------------------------------------------------------------------------------------------------
# helpers


def graph_io_of(path: Path) -> Any:
    from controller.registry.convert.hf_encoders import graph_io

    return graph_io(path)


def as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [int(v) for v in value]
    return [int(value)]


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc
    return value if isinstance(value, dict) else {}

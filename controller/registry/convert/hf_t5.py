"""Export a local T5 checkpoint (text2text) to ``encoder.onnx`` + ``decoder.onnx``.

transformers' own exporter fails on T5's second decoding step, so both graphs are traced
here from small wrappers with an explicit cache:

* ``encoder.onnx``: ``input_ids``, ``attention_mask [batch, source]`` -> ``last_hidden_state`` and,
  with ``past`` (the default), ``cross_key_values.{i}.key|value [batch, heads, source, d_kv]``: the
  decoder's cross-attention keys and values, which depend on the source only, computed once per
  request (with the decoder's projection weights, which therefore live in this graph only).
* ``decoder.onnx`` with ``past``: ``input_ids [batch, step]``, ``encoder_attention_mask``,
  ``cross_key_values.{i}.key|value`` and ``past_key_values.{i}.key|value`` (self-attention cache,
  empty at the first step) -> ``logits`` and ``present.{i}.key|value``. One graph for every step.
* ``decoder.onnx`` without ``past`` (``past=False``): ``input_ids``, ``encoder_hidden_states``,
  ``encoder_attention_mask`` -> ``logits``; the device re-runs the whole target prefix each step
  (simpler, quadratic; kept for runtimes that cannot feed a cache).

The device feeds a decoder input from the encoder output of the same name, and
``encoder_hidden_states`` from ``last_hidden_state``. ``lm_head`` is untied from the shared
embedding before export (see hf_decoders); the embedding both graphs use is then written once, to
``shared.onnx.data``, and both graphs refer to it, so the bundle does not carry it twice.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from controller.registry.convert import ConversionError, ExportedBundle
from controller.registry.convert.hf_decoders import (
    DEFAULT_MAX_NEW_TOKENS,
    TOKENIZER_FILE,
    as_id_list,
    graph_io_of,
    quiet_tracing,
    read_json,
    untie_lm_head,
)
from wire.manifest import Generation, Preprocess, RunSpec, Runtime, Task

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
SHARED_DATA_FILE = "shared.onnx.data"
DEFAULT_OPSET = 17
#: Initializers at least this large are candidates for sharing between the two graphs.
_SHARE_MIN_BYTES = 1 << 20
#: onnxruntime maps external data into memory when the offset is page aligned (64 KiB covers every OS).
_ALIGN = 1 << 16
T5_MODEL_TYPES = frozenset({"t5", "mt5"})


def export_t5(checkpoint_dir: Path, out_dir: Path, **options: Any) -> ExportedBundle:
    """Export the T5 checkpoint in ``checkpoint_dir`` to a text2text bundle in ``out_dir``.

    Options: ``past`` (True: decoder with a self-attention cache and precomputed cross-attention
    keys/values; False: a decoder that recomputes the prefix), ``max_new_tokens`` (default from
    generation_config.json, else 64), ``max_length`` (source truncation, default the tokenizer's
    model_max_length or 512), ``opset`` (17).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    past = bool(options.pop("past", True))
    max_new_opt = options.pop("max_new_tokens", None)
    max_length_opt = options.pop("max_length", None)
    opset = int(options.pop("opset", DEFAULT_OPSET))
    if options:
        raise ConversionError(f"unknown export options {sorted(options)}")
    ckpt = Path(checkpoint_dir)
    _check_checkpoint(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    import torch
    from transformers import AutoModelForSeq2SeqLM

    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(
            ckpt, local_files_only=True, attn_implementation="eager", dtype="float32"
        )
    except Exception as exc:
        raise ConversionError(f"transformers cannot load {ckpt} as a seq2seq model: {exc}") from exc
    model.eval()
    config = model.config
    untied = untie_lm_head(model)
    layers, heads, d_kv = config.num_decoder_layers, config.num_heads, config.d_kv
    encoder_cls, decoder_cls, plain_cls = _wrappers()
    encoder = encoder_cls(model, with_cross=past)
    decoder = decoder_cls(model, layers) if past else plain_cls(model)
    # A new wrapper module starts in training mode, and the exporter restores that mode recursively
    # after tracing: torch would then run with dropout when the graphs are checked.
    encoder.eval()
    decoder.eval()
    samples = _samples(config, batch=2, source=7, target=3, past=4)

    enc_in = ["input_ids", "attention_mask"]
    cross = [f"cross_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    enc_out = ["last_hidden_state", *(cross if past else [])]
    enc_axes = {name: {0: "batch", 1: "source"} for name in (*enc_in, "last_hidden_state")}
    if past:
        enc_axes |= {name: {0: "batch", 2: "source"} for name in cross}
        self_past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        dec_in = ["input_ids", "encoder_attention_mask", *cross, *self_past]
        dec_out = ["logits", *present]
        dec_axes = {
            "input_ids": {0: "batch", 1: "sequence"},
            "encoder_attention_mask": {0: "batch", 1: "source"},
            "logits": {0: "batch", 1: "sequence"},
        }
        dec_axes |= {name: {0: "batch", 2: "source"} for name in cross}
        dec_axes |= {name: {0: "batch", 2: "past_sequence"} for name in self_past}
        dec_axes |= {name: {0: "batch", 2: "total_sequence"} for name in present}
    else:
        dec_in = ["input_ids", "encoder_hidden_states", "encoder_attention_mask"]
        dec_out = ["logits"]
        dec_axes = {
            "input_ids": {0: "batch", 1: "sequence"},
            "encoder_hidden_states": {0: "batch", 1: "source"},
            "encoder_attention_mask": {0: "batch", 1: "source"},
            "logits": {0: "batch", 1: "sequence"},
        }
    with torch.inference_mode(), quiet_tracing():
        enc_sample = (samples["input_ids"], samples["attention_mask"])
        torch.onnx.export(
            encoder,
            enc_sample,
            str(out / ENCODER_FILE),
            input_names=enc_in,
            output_names=enc_out,
            dynamic_axes=enc_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        enc_outputs = encoder(*enc_sample)
        dec_sample = _decoder_sample(samples, enc_outputs, past, layers, heads, d_kv)
        torch.onnx.export(
            decoder,
            tuple(dec_sample),
            str(out / DECODER_FILE),
            input_names=dec_in,
            output_names=dec_out,
            dynamic_axes=dec_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    max_abs_diff = _check_export(out, encoder, decoder, config, past)
    shared = share_initializers(out / ENCODER_FILE, out / DECODER_FILE, out / SHARED_DATA_FILE)
    shutil.copyfile(ckpt / TOKENIZER_FILE, out / TOKENIZER_FILE)
    seconds = time.perf_counter() - started

    gen_config = read_json(ckpt / "generation_config.json")
    start = gen_config.get("decoder_start_token_id", config.decoder_start_token_id)
    if start is None:
        start = config.pad_token_id
    if start is None:
        raise ConversionError(f"{ckpt} names no decoder_start_token_id (generation_config.json or config.json)")
    generation = Generation(
        max_new_tokens=int(max_new_opt or gen_config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        eos_token_id=as_id_list(gen_config.get("eos_token_id", config.eos_token_id)),
        pad_token_id=gen_config.get("pad_token_id", config.pad_token_id),
        decoder_start_token_id=int(start),
        num_layers=layers if past else 0,
        num_kv_heads=heads if past else 0,
        head_dim=d_kv if past else 0,
        do_sample=bool(gen_config.get("do_sample", False)),
        temperature=float(gen_config.get("temperature") or 1.0),
        top_k=int(gen_config.get("top_k") or 0) if gen_config.get("do_sample") else 0,
        decoder=DECODER_FILE,
        encoder=ENCODER_FILE,
    )
    spec = RunSpec(
        task=Task.TEXT2TEXT,
        runtime=Runtime.ONNXRUNTIME,
        io=graph_io_of(out / DECODER_FILE),
        entrypoint=DECODER_FILE,
        preprocess=Preprocess(tokenizer=TOKENIZER_FILE, max_length=_source_length(ckpt, max_length_opt)),
        generation=generation,
    )
    extra = {
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "source": str(ckpt.name),
        "checkpoint": str(ckpt.resolve()),
        "opset": opset,
        "exporter": f"torch.onnx (TorchScript) torch {torch.__version__}, encoder + decoder "
        + ("with self-attention cache and cross-attention keys/values" if past else "without cache"),
        "decoder_past": past,
        "untied_lm_head": untied,
        "shared_initializers": shared,
        "export_seconds": round(seconds, 3),
        "export_max_abs_diff": max_abs_diff,
    }
    log.info(
        "exported %s (t5, past=%s) to %s in %.1f s, max |onnx - torch| %.2e",
        ckpt.name,
        past,
        out,
        seconds,
        max_abs_diff,
    )
    return ExportedBundle(root=out, spec=spec, extra=extra)


def _check_checkpoint(ckpt: Path) -> None:
    if not ckpt.is_dir():
        raise ConversionError(f"{ckpt} is not a directory: pass a Hugging Face checkpoint directory")
    config = read_json(ckpt / "config.json")
    if not config:
        raise ConversionError(f"{ckpt} has no config.json: it is not a Hugging Face checkpoint directory")
    if config.get("model_type") not in T5_MODEL_TYPES:
        raise ConversionError(
            f"{ckpt} is a {config.get('model_type')!r} model, not T5: export_t5 handles {sorted(T5_MODEL_TYPES)}; "
            "decoder-only models go through export_decoder (text-generation)"
        )
    if not (ckpt / TOKENIZER_FILE).is_file():
        raise ConversionError(
            f"{ckpt} has no {TOKENIZER_FILE}: the device tokenizes with the tokenizers package only; "
            "save a fast tokenizer into the checkpoint (tokenizer.save_pretrained) and export again"
        )


def _source_length(ckpt: Path, requested: Any) -> int:
    if requested is not None:
        return int(requested)
    value = read_json(ckpt / "tokenizer_config.json").get("model_max_length")
    # Tokenizers without a limit store a huge sentinel (1e30): T5 itself has relative positions.
    return int(value) if isinstance(value, int) and 0 < value < 1_000_000 else 512


@functools.cache
def _wrappers() -> tuple[type, type, type]:
    """The exported modules, defined lazily so importing this module does not import torch."""
    import torch
    from transformers import DynamicCache, EncoderDecoderCache

    class Encoder(torch.nn.Module):
        """Source ids -> hidden states (+ every decoder layer's cross-attention keys and values)."""

        def __init__(self, model: Any, with_cross: bool) -> None:
            super().__init__()
            self.encoder = model.get_encoder()
            self.decoder = model.get_decoder()
            self.with_cross = with_cross
            self.d_kv = model.config.d_kv

        def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, ...]:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if not self.with_cross:
                return (hidden,)
            flat = [hidden]
            batch, source = hidden.shape[0], hidden.shape[1]
            for block in self.decoder.block:
                attention = block.layer[1].EncDecAttention
                for proj in (attention.k, attention.v):
                    flat.append(proj(hidden).view(batch, source, -1, self.d_kv).transpose(1, 2))
            return tuple(flat)

    class DecoderWithCache(torch.nn.Module):
        """(ids, source mask, cross k/v..., self k/v...) -> (logits, self k/v ...)."""

        def __init__(self, model: Any, layers: int) -> None:
            super().__init__()
            self.model = model
            self.layers = layers
            self.d_model = model.config.d_model

        def forward(self, input_ids: Any, encoder_attention_mask: Any, *caches: Any) -> tuple[Any, ...]:
            n = 2 * self.layers
            cross, own = caches[:n], caches[n:]
            cache = EncoderDecoderCache(
                DynamicCache([(own[2 * i], own[2 * i + 1]) for i in range(self.layers)]),
                DynamicCache([(cross[2 * i], cross[2 * i + 1]) for i in range(self.layers)]),
            )
            # The cross keys/values are in the cache, so the hidden states only give the decoder its
            # shape and the signal that it attends to a source; zeros keep them out of the graph inputs.
            batch, source = encoder_attention_mask.shape
            hidden = torch.zeros((batch, source, self.d_model), dtype=cross[0].dtype)
            out = self.model(
                encoder_outputs=(hidden,),
                attention_mask=encoder_attention_mask,
                decoder_input_ids=input_ids,
                cache=cache,
                use_cache=True,
            )
            flat = [out.logits]
            for layer in out.cache.self_attention_cache.layers:
                flat += [layer.keys, layer.values]
            return tuple(flat)

    class DecoderNoCache(torch.nn.Module):
        """(target prefix, encoder states, source mask) -> logits for every target position."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, encoder_hidden_states: Any, encoder_attention_mask: Any) -> Any:
            return self.model(
                encoder_outputs=(encoder_hidden_states,),
                attention_mask=encoder_attention_mask,
                decoder_input_ids=input_ids,
                use_cache=False,
            ).logits

    return Encoder, DecoderWithCache, DecoderNoCache


def _samples(config: Any, batch: int, source: int, target: int, past: int) -> dict[str, Any]:
    """Random source ids with the last two of row 0 padded, a target chunk, and the past length."""
    import torch

    generator = torch.Generator().manual_seed(batch * 1000 + source * 100 + target * 10 + past)
    ids = torch.randint(3, config.vocab_size, (batch, source), generator=generator, dtype=torch.int64)
    mask = torch.ones(batch, source, dtype=torch.int64)
    if batch > 1:
        mask[0, -2:] = 0
        ids[0, -2:] = config.pad_token_id or 0
    target_ids = torch.randint(3, config.vocab_size, (batch, target), generator=generator, dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": mask, "target": target_ids, "past": past, "generator": generator}


def _decoder_sample(
    samples: dict[str, Any], enc_outputs: tuple[Any, ...], past: bool, layers: int, heads: int, d_kv: int
) -> list[Any]:
    import torch

    if not past:
        return [samples["target"], enc_outputs[0], samples["attention_mask"]]
    batch = samples["target"].shape[0]
    shape = (batch, heads, samples["past"], d_kv)
    own = [torch.randn(shape, generator=samples["generator"]) for _ in range(2 * layers)]
    return [samples["target"], samples["attention_mask"], *enc_outputs[1:], *own]


def _check_export(out: Path, encoder: Any, decoder: Any, config: Any, past: bool) -> float:
    """Both graphs against torch on fresh shapes (past 0 and past > 0); fail if they do not reproduce it."""
    import numpy as np
    import onnxruntime as ort
    import torch

    enc_session = ort.InferenceSession(str(out / ENCODER_FILE), providers=["CPUExecutionProvider"])
    dec_session = ort.InferenceSession(str(out / DECODER_FILE), providers=["CPUExecutionProvider"])
    worst = 0.0
    layers, heads, d_kv = config.num_decoder_layers, config.num_heads, config.d_kv
    for batch, source, target, past_len in ((1, 5, 1, 0), (1, 9, 1, 3), (2, 6, 2, 5)):
        samples = _samples(config, batch, source, target, past_len)
        with torch.inference_mode():
            enc_ref = encoder(samples["input_ids"], samples["attention_mask"])
            dec_inputs = _decoder_sample(samples, enc_ref, past, layers, heads, d_kv)
            dec_ref = decoder(*dec_inputs)
        dec_ref = dec_ref if isinstance(dec_ref, tuple) else (dec_ref,)
        enc_got = enc_session.run(
            None, {"input_ids": samples["input_ids"].numpy(), "attention_mask": samples["attention_mask"].numpy()}
        )
        names = [i.name for i in dec_session.get_inputs()]
        dec_got = dec_session.run(None, dict(zip(names, (t.numpy() for t in dec_inputs), strict=True)))
        for want, have in zip((*enc_ref, *dec_ref), (*enc_got, *dec_got), strict=True):
            if tuple(want.shape) != have.shape:
                raise ConversionError(f"the exported T5 graphs give shape {have.shape}, torch {tuple(want.shape)}")
            if not have.size:
                continue
            diff = float(np.max(np.abs(have - want.numpy())))
            scale = max(1.0, float(np.max(np.abs(want.numpy()))))
            if not np.isfinite(diff) or diff > 1e-3 * scale:
                raise ConversionError(
                    f"the exported T5 graphs do not reproduce torch (batch {batch}, source {source}, past {past_len}):"
                    f" max |diff| {diff:.3g}"
                )
            worst = max(worst, diff)
    return worst


def share_initializers(first: Path, second: Path, data_file: Path) -> list[str]:
    """Move initializers that ``first`` and ``second`` both hold (same bytes) into one external file.

    Returns the shared initializers' names (as in ``first``). Nothing changes when they share nothing.
    """
    import onnx

    models = [onnx.load(str(first)), onnx.load(str(second))]
    by_digest: list[dict[str, Any]] = []
    for model in models:
        table: dict[str, Any] = {}
        for tensor in model.graph.initializer:
            raw = tensor.raw_data
            if len(raw) >= _SHARE_MIN_BYTES:
                table[hashlib.sha256(raw).hexdigest() + str(tensor.data_type) + str(list(tensor.dims))] = tensor
        by_digest.append(table)
    common = sorted(set(by_digest[0]) & set(by_digest[1]))
    if not common:
        return []
    offset = 0
    with data_file.open("wb") as f:
        for key in common:
            raw = by_digest[0][key].raw_data
            f.write(b"\0" * ((-offset) % _ALIGN))
            offset += (-offset) % _ALIGN
            f.write(raw)
            for table in by_digest:
                _point_external(table[key], data_file.name, offset, len(raw))
            offset += len(raw)
    for model, path in zip(models, (first, second), strict=True):
        onnx.save(model, str(path))
    names = [by_digest[0][key].name for key in common]
    log.info("t5: %d initializer(s) stored once in %s for both graphs: %s", len(names), data_file.name, names)
    return names


def _point_external(tensor: Any, location: str, offset: int, length: int) -> None:
    import onnx

    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL

"""Text to text on the device (T5): the encoder once per request, then the decoder token by token.

``generation.encoder`` (``input_ids``, ``attention_mask``) returns ``last_hidden_state`` and possibly
more outputs. optimum's seq2seq exports run with their cache as written: ``decoder_model.onnx`` for the
first step and ``decoder_with_past_model.onnx`` after it (``generation.decoder_with_past``), or the merged
``decoder_model_merged.onnx`` (``use_cache_branch``); see ``generation.SplitCacheDecoder``. Otherwise
a decoder input is fed from the encoder output of the same name (e.g.
``cross_key_values.{i}.key``, the cross-attention keys computed once), ``encoder_hidden_states``
from ``last_hidden_state`` and ``encoder_attention_mask`` from the source mask. A decoder with
``past_key_values.{i}.*`` inputs runs one token per step with its cache (IO binding, as in
``generation``); one without re-runs the whole target prefix each step.

Records are ``{"text": str, "max_new_tokens"?: int, "truncate"?: bool}``; results as for generation.
A source text longer than ``preprocess.max_length`` tokens is refused with the limit unless the record
says ``"truncate": true``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from agent.inference.pipelines.base import PipelineError
from agent.inference.pipelines.generation import (
    Prompt,
    SplitCacheDecoder,
    TokenPicker,
    TokenStreamPipeline,
    generation_settings,
    graph_inputs,
    layer_order,
    load_tokenizer,
)
from agent.inference.session import InputError, load_session
from wire.manifest import RunSpec

log = logging.getLogger(__name__)

_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class Text2TextPipeline(TokenStreamPipeline):
    """``{"text", "max_new_tokens"?}`` -> ``{"text", "tokens"}`` over an encoder and a decoder graph."""

    record_key = "text"

    def __init__(self, spec: RunSpec, root: Path, threads: int = 0, *, seed: int | None = None) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.spec = spec
        self.root = Path(root)
        self.generation = generation_settings(spec)
        if self.generation.decoder_start_token_id is None:
            raise PipelineError("a text2text bundle needs generation.decoder_start_token_id")
        self.tokenizer = load_tokenizer(spec, self.root)
        encoder_path = self.root / (self.generation.encoder or "encoder.onnx")
        decoder_path = self.root / (self.generation.decoder or spec.entrypoint)
        with_past = self.root / self.generation.decoder_with_past if self.generation.decoder_with_past else None
        for path in (encoder_path, decoder_path, with_past):
            if path is not None and not path.is_file():
                raise PipelineError(f"graph {path.name} is missing from the bundle")
        self.picker = TokenPicker(self.generation, seed)
        self.eos = set(self.generation.eos_token_id)
        self.max_length = spec.preprocess.max_length
        self.encoder = load_session(encoder_path, threads)
        self.encoder_inputs = [i.name for i in self.encoder.get_inputs()]
        self.encoder_outputs = [o.name for o in self.encoder.get_outputs()]
        self.split: SplitCacheDecoder | None = None
        if with_past is not None or "use_cache_branch" in graph_inputs(decoder_path):
            self.split = SplitCacheDecoder(decoder_path, with_past, threads)
            self.decoder = self.split.first
            decoder_inputs = {**self.split.first_inputs, **self.split.step_inputs}
            self.from_encoder = [n for n in decoder_inputs if n in self.encoder_outputs]
            self.wants_hidden = "encoder_hidden_states" in decoder_inputs
            self.wants_mask = "encoder_attention_mask" in decoder_inputs
            self.past = []
            return
        self.decoder = load_session(decoder_path, threads)
        decoder_inputs = {i.name: i for i in self.decoder.get_inputs()}
        self.decoder_outputs = [o.name for o in self.decoder.get_outputs()]
        if "input_ids" not in decoder_inputs or "logits" not in self.decoder_outputs:
            raise PipelineError(f"{decoder_path.name} must take input_ids and return logits")
        self.past = sorted((n for n in decoder_inputs if n.startswith("past_key_values.")), key=layer_order)
        self.present = ["present." + n[len("past_key_values.") :] for n in self.past]
        missing = [n for n in self.present if n not in self.decoder_outputs]
        if missing:
            raise PipelineError(f"{decoder_path.name} takes a past cache but returns no {missing[0]!r}")
        self.from_encoder = [n for n in decoder_inputs if n in self.encoder_outputs]
        self.wants_hidden = "encoder_hidden_states" in decoder_inputs
        self.wants_mask = "encoder_attention_mask" in decoder_inputs
        known = {"input_ids", "encoder_hidden_states", "encoder_attention_mask", *self.past, *self.from_encoder}
        unknown = sorted(set(decoder_inputs) - known)
        if unknown:
            raise PipelineError(f"{decoder_path.name} takes inputs this pipeline cannot feed: {unknown}")
        first = decoder_inputs[self.past[0]] if self.past else None
        self.dtype = _FLOAT_TYPES.get(first.type, np.float32) if first is not None else np.float32
        heads = self.generation.num_kv_heads or (first.shape[1] if first is not None else 0)
        head_dim = self.generation.head_dim or (first.shape[3] if first is not None else 0)
        if self.past and not (isinstance(heads, int) and isinstance(head_dim, int)):
            raise PipelineError("the cache geometry is unknown: set generation.num_kv_heads and head_dim")
        self.kv_heads, self.head_dim = int(heads or 0), int(head_dim or 0)

    def encode(self, text: str) -> list[int]:
        """Source ids (the tokenizer's template adds T5's closing ``</s>``)."""
        ids = list(self.tokenizer.encode(text).ids)
        if not ids:
            raise InputError("the text is empty")
        return ids

    def prepare(self, prompt: Prompt) -> tuple[list[int], int, bool]:
        """The source ids within ``max_length`` (cut only when the record allows it)."""
        ids = self.encode(prompt.text)
        if len(ids) <= self.max_length:
            return ids, prompt.max_new, False
        if not prompt.truncate:
            raise InputError(
                f"the text is {len(ids)} tokens, over the model's limit of {self.max_length}: shorten it, or send"
                ' "truncate": true to have it cut to the limit'
            )
        # keep the closing token the tokenizer's template added, as Hugging Face's truncation does
        return ids[: self.max_length - 1] + ids[-1:], prompt.max_new, True

    def token_ids(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """Generated ids for the source ``prompt_ids`` (EOS included when produced)."""
        ids = np.asarray([prompt_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        feeds = {"input_ids": ids, "attention_mask": mask}
        encoded = dict(
            zip(self.encoder_outputs, self.encoder.run(None, {n: feeds[n] for n in self.encoder_inputs}), strict=True)
        )
        constant: dict[str, np.ndarray] = {n: encoded[n] for n in self.from_encoder}
        if self.wants_hidden:
            constant["encoder_hidden_states"] = encoded["last_hidden_state"]
        if self.wants_mask:
            constant["encoder_attention_mask"] = mask
        start = int(self.generation.decoder_start_token_id or 0)
        if self.split is not None:

            def following(token: int) -> dict[str, np.ndarray]:
                return constant | {"input_ids": np.asarray([[token]], dtype=np.int64)}

            first = constant | {"input_ids": np.asarray([[start]], dtype=np.int64)}
            yield from self.split.steps(first, following, max_new_tokens, self.picker, self.eos)
        elif self.past:
            yield from self._with_cache(start, constant, max_new_tokens)
        else:
            yield from self._without_cache(start, constant, max_new_tokens)

    def _with_cache(self, start: int, constant: dict[str, np.ndarray], max_new: int) -> Iterator[int]:
        ort = self._ort
        binding = self.decoder.io_binding()
        # Bound CPU buffers are read at run time: keep every one referenced until the loop ends.
        held = {name: np.ascontiguousarray(value) for name, value in constant.items()}
        for name, value in held.items():
            binding.bind_cpu_input(name, value)
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        cache = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past]
        logits_index = self.decoder_outputs.index("logits")
        token_ids = np.asarray([[start]], dtype=np.int64)
        for step in range(max_new):
            binding.bind_cpu_input("input_ids", token_ids)
            for name, value in zip(self.past, cache, strict=True):
                binding.bind_ortvalue_input(name, value)
            binding.clear_binding_outputs()
            for name in self.decoder_outputs:
                binding.bind_output(name, "cpu")
            self.decoder.run_with_iobinding(binding)
            values = binding.get_outputs()
            token = self.picker(values[logits_index].numpy()[0, -1])
            yield token
            if token in self.eos or step == max_new - 1:
                return
            by_name = dict(zip(self.decoder_outputs, values, strict=True))
            cache = [by_name[name] for name in self.present]
            token_ids = np.asarray([[token]], dtype=np.int64)

    def _without_cache(self, start: int, constant: dict[str, np.ndarray], max_new: int) -> Iterator[int]:
        target = [start]
        for _ in range(max_new):
            feeds = dict(constant, input_ids=np.asarray([target], dtype=np.int64))
            logits = self.decoder.run(["logits"], feeds)[0]
            token = self.picker(logits[0, -1])
            yield token
            if token in self.eos:
                return
            target.append(token)

    def close(self) -> None:
        self.encoder = None
        self.decoder = None
        if self.split is not None:
            self.split.close()

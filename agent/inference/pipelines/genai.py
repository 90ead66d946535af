"""Text generation with onnxruntime-genai's own loop (bundles built by its model builder).

The model runs in onnxruntime-genai (``Model``/``Generator``, C++ loop, cache written in place);
the text side uses the bundle's ``tokenizer.json`` through the ``tokenizers`` package like every
other pipeline, so a prompt becomes the same ids whichever runtime serves it (onnxruntime-genai's
own tokenizer, for one, does not add Llama's BOS for a byte-level tokenizer.json).

onnxruntime-genai is not part of the agent's base dependencies: without it the bundle still runs,
through the plain onnxruntime loop (the builder's graph keeps the ``decoder.onnx`` contract), with a
warning. Records and results are those of ``DecoderGenerationPipeline``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.inference.pipelines.base import PipelineError
from agent.inference.pipelines.generation import (
    DecoderGenerationPipeline,
    TokenStreamPipeline,
    check_context,
    encode_prompt,
    generation_settings,
    load_tokenizer,
)
from wire.manifest import RunSpec, Runtime

log = logging.getLogger(__name__)


class GenaiGenerationPipeline(TokenStreamPipeline):
    """``{"prompt", "max_new_tokens"?}`` -> ``{"text", "tokens"}`` with onnxruntime-genai's generator."""

    def __init__(self, spec: RunSpec, root: Path, threads: int = 0, *, seed: int | None = None) -> None:
        self.spec = spec
        self.root = Path(root)
        self.generation = generation_settings(spec)
        self.eos = set(self.generation.eos_token_id)
        self.context = spec.preprocess.max_length
        self.seed = seed
        self.model: Any = None
        self.fallback: DecoderGenerationPipeline | None = None
        #: the agent's own loop on the same graph, for teacher forcing (``forcing_loop``)
        self._forcing: DecoderGenerationPipeline | None = None
        self.threads = threads
        try:
            import onnxruntime_genai as og
        except ImportError:
            log.warning("onnxruntime-genai is not installed: running %s with the plain onnxruntime loop", self.root)
            self.fallback = DecoderGenerationPipeline(spec, self.root, threads, seed=seed)
            self.tokenizer = self.fallback.tokenizer
            return
        self._og = og
        if not (self.root / "genai_config.json").is_file():
            raise PipelineError(f"{self.root} has no genai_config.json: it is not an onnxruntime-genai model folder")
        self.tokenizer = load_tokenizer(spec, self.root)
        try:
            config = og.Config(str(self.root))
            if threads > 0:
                options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
                config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            self.model = og.Model(config)
        except Exception as exc:
            raise PipelineError(f"onnxruntime-genai cannot load {self.root}: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.generation.bos_token_id)

    def token_ids(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """Generated ids for already tokenized ``prompt_ids`` (onnxruntime-genai's loop)."""
        if self.fallback is not None:
            yield from self.fallback.token_ids(prompt_ids, max_new_tokens)
            return
        og = self._og
        ids, max_new = list(prompt_ids), max_new_tokens
        check_context(ids, max_new, self.context)
        params = og.GeneratorParams(self.model)
        search: dict[str, Any] = {"max_length": len(ids) + max_new, "do_sample": self.generation.do_sample}
        if self.generation.do_sample:
            search |= {"temperature": self.generation.temperature, "top_k": self.generation.top_k}
            if self.seed is not None:
                search["random_seed"] = self.seed
        params.set_search_options(**search)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        produced = 0
        # genai stops at its own configured EOS; the manifest's list is checked as well.
        while not generator.is_done() and produced < max_new:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            produced += 1
            yield token
            if token in self.eos:
                return

    def forcing_loop(self) -> Any:
        """onnxruntime-genai picks its tokens inside its generator: teacher forcing runs the same graph in the
        agent's own loop (the builder's graphs keep the decoder contract it needs)."""
        if self.fallback is not None:
            return self.fallback
        if self._forcing is None:
            plain = self.spec.model_copy(update={"runtime": Runtime.ONNXRUNTIME})
            self._forcing = DecoderGenerationPipeline(plain, self.root, self.threads)
        return self._forcing

    def close(self) -> None:
        for loop in (self.fallback, self._forcing):
            if loop is not None:
                loop.close()
        self.model = None

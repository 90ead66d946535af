"""Text generation on the device: a decoder with a KV cache driven by a plain onnxruntime loop.

The graph (``generation.decoder``, default the entrypoint) takes ``input_ids``, ``attention_mask``,
``position_ids`` when it declares them, and ``past_key_values.{i}.key|value``; it returns ``logits``
and ``present.{i}.key|value``. The prompt runs once with an empty cache, then one token per step.

The loop keeps the cache in onnxruntime's own buffers (IO binding): each step's ``present`` values are
bound as the next step's ``past`` without a round trip through numpy. Graphs built by
onnxruntime-genai's model builder (``GroupQueryAttention``) can also write the cache in place into a
buffer sized for the whole request, as onnxruntime-genai does; the bundle's ``genai_config.json`` says
when (``past_present_share_buffer``). On a 4-layer, 256-wide Llama the graph's own run is ~95% of a
step and this loop matches onnxruntime-genai's C++ loop on the same graph (single-threaded: 0.95-1.05x);
the traced graphs (``Concat`` caches, unfused attention) are slower, whatever runs them.

Decoders come as the exporters write them: one graph with a cache (``past_key_values.*`` in,
``present.*`` out; slmfleet's and optimum's ``model.onnx``), one graph without (each step re-runs the whole
sequence), two graphs (optimum's ``decoder_model.onnx`` for the prompt and ``decoder_with_past_model.onnx``
for every later step) or their merge (``decoder_model_merged.onnx``, whose ``use_cache_branch`` input picks one).

Records are ``{"prompt": str, "max_new_tokens"?: int, "truncate"?: bool}``; results
``{"text": str, "tokens": int, "token_ids": [int], "finish_reason": "eos"|"length"}`` where ``tokens``
counts every generated token, the end-of-sequence token included (it cost a step), while ``text`` never
contains it. The prompt plus ``max_new_tokens`` must fit the model's context (``preprocess.max_length``):
a record that asked for more new tokens than fit is refused with the limit; one that did not ask gets the
room left; a prompt is cut (its first tokens dropped) only when the record says ``"truncate": true``, and
the result then says ``"truncated": true``. Only numpy, tokenizers and onnxruntime are used (no torch).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.inference.pipelines.base import PipelineError
from agent.inference.session import InputError, load_session
from wire.manifest import Generation, RunSpec

log = logging.getLogger(__name__)

#: Upper bound on a record's own ``max_new_tokens`` (the context length bounds it too).
MAX_NEW_TOKENS_LIMIT = 4096
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


# ---------------------------------------------------------------------------------------------------------
# Shared by the generation pipelines (plain loop, onnxruntime-genai, text2text)


def load_tokenizer(spec: RunSpec, root: Path) -> Any:
    """The bundle's ``tokenizers.Tokenizer``, with any padding or truncation of tokenizer.json switched off
    (a prompt is one sequence; the pipeline truncates it to fit the context itself)."""
    from tokenizers import Tokenizer

    if spec.preprocess.tokenizer is None:
        raise PipelineError(f"a {spec.task.value} bundle needs preprocess.tokenizer (a tokenizer.json)")
    path = root / spec.preprocess.tokenizer
    if not path.is_file():
        raise PipelineError(f"tokenizer file {path} is missing from the bundle")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise PipelineError(f"cannot load tokenizer {path}: {exc}") from exc
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def generation_settings(spec: RunSpec) -> Generation:
    if spec.generation is None:
        raise PipelineError(f"a {spec.task.value} bundle needs 'generation' settings")
    return spec.generation


@dataclass
class Prompt:
    """A generation record, checked: its text, how many tokens to generate, and what the sender allows."""

    text: str
    max_new: int
    #: the sender named max_new_tokens (else the manifest's default, which may shrink to the room left)
    explicit: bool
    truncate: bool


def parse_record(record: Any, key: str, default_max_new: int) -> Prompt:
    """The text, ``max_new_tokens`` and ``truncate`` of a record, or InputError saying what is wrong."""
    if not isinstance(record, dict):
        raise InputError(f"a record must be a JSON object with a {key!r} string, got {type(record).__name__}")
    text = record.get(key)
    if not isinstance(text, str):
        raise InputError(f"the record needs a {key!r} string")
    explicit = "max_new_tokens" in record
    max_new = record.get("max_new_tokens", default_max_new)
    # bool is an int subclass: "max_new_tokens": true is a client bug, not 1.
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= MAX_NEW_TOKENS_LIMIT:
        raise InputError(f"max_new_tokens must be an integer between 1 and {MAX_NEW_TOKENS_LIMIT}")
    truncate = record.get("truncate", False)
    if not isinstance(truncate, bool):
        raise InputError(f'"truncate" must be true or false, got {type(truncate).__name__}')
    return Prompt(text, max_new, explicit, truncate)


def fit_context(ids: list[int], prompt: Prompt, context: int | None) -> tuple[list[int], int, bool]:
    """(prompt ids, new tokens, truncated) that fit ``context``, or InputError that says the limit.

    Nothing is cut unless the sender allowed it: an explicit ``max_new_tokens`` that does not fit is
    refused, the manifest's default shrinks to the room the prompt leaves, and a prompt that leaves no
    room is refused unless ``truncate`` (then its last tokens are kept).
    """
    max_new = prompt.max_new
    if context is None or len(ids) + max_new <= context:
        return ids, max_new, False
    if not prompt.explicit and len(ids) < context:
        return ids, context - len(ids), False
    if prompt.truncate:
        room = context - max_new
        if room < 1:
            raise InputError(
                f"max_new_tokens {max_new} leaves no room for a prompt in the model's context of {context}"
                f" tokens: ask for at most {context - 1}"
            )
        return ids[-room:], max_new, True
    if len(ids) >= context:
        raise InputError(
            f"the prompt is {len(ids)} tokens, over the model's context of {context} tokens: shorten it, or"
            ' send "truncate": true to keep its last tokens'
        )
    raise InputError(
        f"the prompt is {len(ids)} tokens and max_new_tokens is {max_new}: together over the model's context of"
        f" {context} tokens; ask for at most {context - len(ids)} new tokens, shorten the prompt, or send"
        f' "truncate": true to keep its last {max(context - max_new, 0)} tokens'
    )


def run_records(
    records: list[Any], parse: Callable[[Any], Any], generate: Callable[[Any], dict[str, Any]]
) -> list[dict[str, Any]]:
    """One result per record, in order; a bad record alone raises, in a batch it becomes ``{"error"}``."""
    parsed: list[Any] = []
    for record in records:
        try:
            parsed.append(parse(record))
        except InputError as exc:
            if len(records) == 1:
                raise
            parsed.append(exc)
    return [{"error": str(p)} if isinstance(p, InputError) else generate(p) for p in parsed]


class IncrementalDecoder:
    """Turns token ids into text pieces as they arrive, never splitting a multi-byte character.

    Decoding a window of the last few tokens (not each token alone) keeps what the tokenizer's decoder
    does across token boundaries (byte-level merges, SentencePiece spaces); a window whose text ends in
    U+FFFD is an unfinished UTF-8 sequence and waits for the next token. ``finish`` returns whatever the
    full decode has beyond what was streamed, so the pieces always add up to ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted: list[str] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip))

    def push(self, token_id: int) -> str:
        """The new text that ``token_id`` completes ("" while a character is still unfinished)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            piece = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.emitted.append(piece)
            return piece
        return ""

    def finish(self) -> str:
        """The rest of the text (e.g. a trailing U+FFFD for bytes that never completed a character)."""
        full = self._decode(self.ids)
        done = "".join(self.emitted)
        if not full.startswith(done):
            # Not seen with byte-level BPE or SentencePiece; the stream cannot take text back.
            log.warning("streamed text is not a prefix of the full decode; the stream and run() differ")
            return ""
        rest = full[len(done) :]
        if rest:
            self.emitted.append(rest)
        return rest


class TokenPicker:
    """Greedy argmax, or temperature / top-k sampling when the manifest asks for it."""

    def __init__(self, generation: Generation, seed: int | None = None) -> None:
        self.sample = generation.do_sample
        self.temperature = generation.temperature
        self.top_k = generation.top_k
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if not self.sample:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            keep = np.argpartition(scores, -self.top_k)[-self.top_k :]
            scores = scores[keep]
        else:
            keep = None
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        choice = int(self.rng.choice(probs.shape[-1], p=probs))
        return int(keep[choice]) if keep is not None else choice


@dataclass
class Generated:
    """One request's outcome: generated ids (EOS included if produced) and timings."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float = 0.0
    finish_reason: str = "length"
    truncated: bool = False

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "text": self.text,
            "tokens": len(self.token_ids),
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
        }
        if self.truncated:
            out["truncated"] = True
        return out


def check_context(ids: list[int], max_new: int, context: int | None) -> None:
    """InputError unless ``ids`` plus ``max_new`` tokens fit ``context`` (callers that encode themselves)."""
    if context is not None and len(ids) + max_new > context:
        raise InputError(
            f"{len(ids)} prompt tokens and {max_new} new tokens are over the model's context of {context} tokens"
        )


# ---------------------------------------------------------------------------------------------------------
# The KV-cache loop


class KVCacheDecoder:
    """One onnxruntime session of a decoder graph with a KV cache, stepped with IO binding."""

    def __init__(self, path: Path, generation: Generation, threads: int = 0, share_buffer: bool = False) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.session = load_session(path, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        for required in ("input_ids", "attention_mask"):
            if required not in inputs:
                raise PipelineError(f"{path.name} has no {required!r} input (it takes {sorted(inputs)})")
        if "logits" not in outputs:
            raise PipelineError(f"{path.name} has no 'logits' output (it returns {outputs})")
        self.past = sorted((n for n in inputs if n.startswith("past_key_values.")), key=layer_order)
        self.present = ["present." + n[len("past_key_values.") :] for n in self.past]
        missing = [n for n in self.present if n not in outputs]
        if missing:
            raise PipelineError(f"{path.name} takes a past cache but returns no {missing[0]!r}")
        self.outputs = outputs
        self.has_positions = "position_ids" in inputs
        first = inputs[self.past[0]] if self.past else None
        self.dtype = _FLOAT_TYPES.get(first.type, np.float32) if first is not None else np.float32
        heads = generation.num_kv_heads or (first.shape[1] if first is not None else 0)
        head_dim = generation.head_dim or (first.shape[3] if first is not None else 0)
        if self.past and not (isinstance(heads, int) and isinstance(head_dim, int) and heads > 0 and head_dim > 0):
            raise PipelineError("the cache geometry is unknown: set generation.num_kv_heads and head_dim")
        self.kv_heads, self.head_dim = int(heads), int(head_dim)
        self.share_buffer = share_buffer and bool(self.past)

    def tokens(
        self, prompt: list[int], max_new: int, pick: Callable[[np.ndarray], int], eos: set[int]
    ) -> Iterator[int]:
        """Yield up to ``max_new`` generated ids for ``prompt`` (batch 1), stopping after an EOS id."""
        ort = self._ort
        total = len(prompt)
        limit = total + max_new
        binding = self.session.io_binding()
        # Arrays bound with bind_cpu_input are read when the graph runs, not when bound: they stay
        # referenced (and may be updated in place) for the whole loop.
        mask = np.ones((1, limit), dtype=np.int64)
        prompt_ids = np.asarray([prompt], dtype=np.int64)
        prompt_positions = np.arange(total, dtype=np.int64)[None]
        if self.share_buffer:
            shape = (1, self.kv_heads, limit, self.head_dim)
            cache = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.dtype)) for _ in self.past]
        else:
            empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
            cache = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past]

        # The prompt: every position's logits come back in a buffer onnxruntime allocates.
        binding.bind_cpu_input("input_ids", prompt_ids)
        binding.bind_cpu_input("attention_mask", mask[:, :total])
        if self.has_positions:
            binding.bind_cpu_input("position_ids", prompt_positions)
        # Outputs come back in the order they were first bound (a rebinding keeps its place): logits,
        # then the presents; other outputs a graph may have are not bound, so not computed.
        binding.bind_output("logits", "cpu")
        self._bind_cache(binding, cache)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[self._output_index(binding, "logits")].numpy()
        token = pick(logits[0, -1])
        yield token
        if token in eos or max_new == 1:
            return

        # One token per step: the id, position and logits buffers are bound once and reused in place.
        step_ids = np.zeros((1, 1), dtype=np.int64)
        step_positions = np.zeros((1, 1), dtype=np.int64)
        step_logits = np.empty((1, 1, logits.shape[-1]), dtype=logits.dtype)
        binding.bind_cpu_input("input_ids", step_ids)
        if self.has_positions:
            binding.bind_cpu_input("position_ids", step_positions)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(step_logits))
        for _ in range(max_new - 1):
            if not self.share_buffer:
                cache = [outputs[self._output_index(binding, name)] for name in self.present]
                self._bind_cache(binding, cache)
            step_ids[0, 0] = token
            step_positions[0, 0] = total
            total += 1
            binding.bind_cpu_input("attention_mask", mask[:, :total])
            self.session.run_with_iobinding(binding)
            if not self.share_buffer:
                outputs = binding.get_outputs()
            token = pick(step_logits[0, -1])
            yield token
            if token in eos:
                return

    def _bind_cache(self, binding: Any, cache: list[Any]) -> None:
        """Bind ``cache`` as the past; the present goes into the same buffers (shared) or new ones."""
        for past, present, value in zip(self.past, self.present, cache, strict=True):
            binding.bind_ortvalue_input(past, value)
            if self.share_buffer:
                binding.bind_ortvalue_output(present, value)
            else:
                binding.bind_output(present, "cpu")

    def _output_index(self, binding: Any, name: str) -> int:
        """Where ``name`` is among ``binding.get_outputs()``: logits first, then the presents."""
        return 0 if name == "logits" else 1 + self.present.index(name)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of ``ids`` from one pass with an empty cache (``[len(ids), vocab]``)."""
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        }
        if self.has_positions:
            feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        feeds |= {name: empty for name in self.past}
        return np.asarray(self.session.run(["logits"], feeds)[0][0])

    def close(self) -> None:
        self.session = None


class FullSequenceDecoder:
    """A decoder graph without a cache (optimum's ``text-generation`` export): every step runs the whole
    sequence again, so a step costs more as the text grows; the export with past is the fast one."""

    share_buffer = False

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.session = load_session(path, threads)
        self.inputs = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if "input_ids" not in self.inputs or "logits" not in outputs:
            raise PipelineError(f"{path.name} must take input_ids and return logits (it returns {outputs})")

    def logits(self, ids: list[int]) -> np.ndarray:
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None],
        }
        return np.asarray(self.session.run(["logits"], {k: v for k, v in feeds.items() if k in self.inputs})[0][0])

    def tokens(
        self, prompt: list[int], max_new: int, pick: Callable[[np.ndarray], int], eos: set[int]
    ) -> Iterator[int]:
        ids = list(prompt)
        for _ in range(max_new):
            token = pick(self.logits(ids)[-1])
            yield token
            if token in eos:
                return
            ids.append(token)

    def close(self) -> None:
        self.session = None


class SplitCacheDecoder:
    """optimum's decoders in two graphs: ``first`` for the first step (no cache in, every ``present.*`` out)
    and ``step`` with the cache, or one merged graph that takes ``use_cache_branch`` to pick the branch
    (it then wants placeholder caches on the first step, which it ignores).

    Also serves seq2seq decoders: ``constant`` feeds (``encoder_hidden_states``, ``encoder_attention_mask``)
    go to every step a graph takes them, and the cross-attention cache (``present.{i}.encoder.*``) is taken
    from the first step only (the with-past graph does not return it: it does not change).
    """

    share_buffer = False

    def __init__(self, first: Path, step: Path | None, threads: int = 0) -> None:
        self.first = load_session(first, threads)
        self.step = self.first if step is None or step == first else load_session(step, threads)
        self.first_inputs = {i.name: i for i in self.first.get_inputs()}
        self.step_inputs = {i.name: i for i in self.step.get_inputs()}
        self.merged = "use_cache_branch" in self.first_inputs
        self.past = [n for n in self.step_inputs if n.startswith("past_key_values.")]
        if not self.past:
            raise PipelineError(f"{(step or first).name} takes no past_key_values: it is not a decoder with a cache")
        for session, name in ((self.first, first.name), (self.step, (step or first).name)):
            if "logits" not in [o.name for o in session.get_outputs()]:
                raise PipelineError(f"{name} has no 'logits' output")

    def _placeholders(self, batch_len: int) -> dict[str, np.ndarray]:
        """Empty caches for the merged graph's first step (the no-cache branch ignores them)."""
        out = {}
        for name in self.past:
            info = self.first_inputs[name]
            dims = [d if isinstance(d, int) else 0 for d in info.shape]
            dims[0] = batch_len
            out[name] = np.zeros(dims, dtype=_FLOAT_TYPES.get(info.type, np.float32))
        return out

    def _run(self, session: Any, inputs: dict[str, Any], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, {k: v for k, v in feeds.items() if k in inputs})
        return dict(zip(names, values, strict=True))

    def steps(
        self,
        first_feeds: dict[str, np.ndarray],
        next_feeds: Callable[[int], dict[str, np.ndarray]],
        max_new: int,
        pick: Callable[[np.ndarray], int],
        eos: set[int],
    ) -> Iterator[int]:
        """Yield up to ``max_new`` ids: the first step runs ``first_feeds``; each later one the feeds
        ``next_feeds(token)`` gives for the previous token, plus the cache."""
        feeds = dict(first_feeds)
        if self.merged:
            feeds |= self._placeholders(1)
            feeds["use_cache_branch"] = np.asarray([False])
        out = self._run(self.first, self.first_inputs, feeds)
        cache = {"past_key_values." + n[len("present.") :]: v for n, v in out.items() if n.startswith("present.")}
        missing = [n for n in self.past if n not in cache]
        if missing:
            raise PipelineError(f"the first decoder step returns no {missing[0].replace('past_key_values', 'present')}")
        for step in range(max_new):
            token = pick(out["logits"][0, -1])
            yield token
            if token in eos or step == max_new - 1:
                return
            feeds = next_feeds(token) | {n: cache[n] for n in self.past}
            if self.merged:
                feeds["use_cache_branch"] = np.asarray([True])
            out = self._run(self.step, self.step_inputs, feeds)
            for name, value in out.items():
                # the cross-attention cache is the first step's: a with-past graph does not return it,
                # a merged one returns a copy of what it was given
                if name.startswith("present.") and ".encoder." not in name:
                    cache["past_key_values." + name[len("present.") :]] = value

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of ``ids`` from the first-step graph (``[len(ids), vocab]``)."""
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None],
        }
        if self.merged:
            feeds |= self._placeholders(1)
            feeds["use_cache_branch"] = np.asarray([False])
        return np.asarray(self._run(self.first, self.first_inputs, feeds)["logits"][0])

    def tokens(
        self, prompt: list[int], max_new: int, pick: Callable[[np.ndarray], int], eos: set[int]
    ) -> Iterator[int]:
        """Decoder-only generation for ``prompt`` (batch 1)."""
        total = len(prompt)
        first = {
            "input_ids": np.asarray([prompt], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(total, dtype=np.int64)[None],
        }
        position = [total]

        def following(token: int) -> dict[str, np.ndarray]:
            position[0] += 1
            return {
                "input_ids": np.asarray([[token]], dtype=np.int64),
                "attention_mask": np.ones((1, position[0]), dtype=np.int64),
                "position_ids": np.asarray([[position[0] - 1]], dtype=np.int64),
            }

        return self.steps(first, following, max_new, pick, eos)

    def close(self) -> None:
        self.first = None
        self.step = None


def graph_inputs(path: Path) -> set[str]:
    """The input names of an ONNX graph (read by onnxruntime without optimizing it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        probe = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PipelineError(f"cannot load graph {path.name}: {exc}") from exc
    return {i.name for i in probe.get_inputs()}


def layer_order(name: str) -> tuple[int, str]:
    """past_key_values.{i}.key|value sorted by layer, key before value."""
    parts = name.split(".")
    try:
        return int(parts[1]), ".".join(parts[2:])
    except (IndexError, ValueError):
        return 1 << 30, name


def genai_shares_buffer(root: Path) -> bool:
    """True when the bundle's genai_config.json says its graph writes the cache in place."""
    path = root / "genai_config.json"
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("search", {}).get("past_present_share_buffer", False))


# ---------------------------------------------------------------------------------------------------------
# The pipelines


class TokenStreamPipeline:
    """run / stream / generate / warmup over two methods a subclass provides: ``encode`` (text to ids)
    and ``token_ids`` (ids to generated ids, one at a time). Subclasses set ``generation``,
    ``tokenizer`` and ``eos``."""

    #: the record field holding the input text
    record_key = "prompt"
    generation: Generation
    tokenizer: Any
    eos: set[int]
    #: prompt plus new tokens may not exceed this (None: no limit of that kind)
    context: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_ids(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        raise NotImplementedError

    def _parse(self, record: Any) -> Prompt:
        return parse_record(record, self.record_key, self.generation.max_new_tokens)

    def prepare(self, prompt: Prompt) -> tuple[list[int], int, bool]:
        """(input ids, new tokens, truncated) for a checked record; InputError when it does not fit."""
        return fit_context(self.encode(prompt.text), prompt, self.context)

    def generate(self, record: Any) -> Generated:
        """Generate for one record and keep the ids and timings."""
        prompt = self._parse(record)
        started = time.perf_counter()
        ids, max_new, truncated = self.prepare(prompt)
        out = Generated(prompt_tokens=len(ids), truncated=truncated)
        for token in self.token_ids(ids, max_new):
            if not out.token_ids:
                out.first_token_seconds = time.perf_counter() - started
            out.token_ids.append(token)
        if out.token_ids and out.token_ids[-1] in self.eos:
            out.finish_reason = "eos"
        text_ids = out.token_ids[:-1] if out.finish_reason == "eos" else out.token_ids
        out.text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        out.seconds = time.perf_counter() - started
        return out

    def run(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per record, in order; see ``agent.inference.pipelines`` for the formats."""

        def parse(record: Any) -> Any:
            self._parse(record)
            return record

        return run_records(records, parse, lambda record: self.generate(record).result())

    def stream(self, record: dict[str, Any]) -> Iterator[str]:
        """Text pieces as tokens are generated; joined they equal ``run([record])[0]["text"]``."""
        ids, max_new, _ = self.prepare(self._parse(record))
        decoder = IncrementalDecoder(self.tokenizer)
        for token in self.token_ids(ids, max_new):
            if token in self.eos:
                break
            piece = decoder.push(token)
            if piece:
                yield piece
        rest = decoder.finish()
        if rest:
            yield rest

    def warmup(self) -> None:
        self.generate({self.record_key: "warm up", "max_new_tokens": 2})

    def forced(self, record: dict[str, Any], target: list[int]) -> list[int]:
        """Teacher forcing: this model's greedy choice at each position of ``target`` when it is fed ``target``
        itself (another model's tokens for the same ``record``), through the loop that generates.

        A variant compared this way is not thrown off course by its first different token, as it is when both
        decode freely: each position tests the same context on both sides.
        """
        if not target:
            return []
        ids, _, _ = self.prepare(self._parse(dict(record, max_new_tokens=len(target))))
        choices: list[int] = []

        def follow(logits: np.ndarray) -> int:
            choices.append(int(np.argmax(logits)))
            return target[len(choices) - 1]

        loop = self.forcing_loop()
        saved = loop.picker
        loop.picker = follow
        try:
            for _ in loop.token_ids(ids, len(target)):
                pass
        finally:
            loop.picker = saved
        return choices

    def forcing_loop(self) -> Any:
        """The pipeline whose ``picker`` chooses every token of ``token_ids`` (itself for the agent's loops)."""
        if not hasattr(self, "picker"):
            raise PipelineError(f"{type(self).__name__} picks its tokens itself: it cannot be teacher-forced")
        return self

    def close(self) -> None:
        """Release the model; subclasses drop their sessions."""


def encode_prompt(tokenizer: Any, text: str, bos_token_id: int | None) -> list[int]:
    """Prompt ids as the checkpoint's tokenizer makes them (special tokens such as BOS included)."""
    ids = list(tokenizer.encode(text).ids)
    if not ids:
        if bos_token_id is None:
            raise InputError("the prompt is empty and the model has no BOS token to start from")
        ids = [bos_token_id]
    return ids


class DecoderGenerationPipeline(TokenStreamPipeline):
    """``{"prompt", "max_new_tokens"?}`` -> ``{"text", "tokens"}`` over a decoder graph with a KV cache."""

    def __init__(self, spec: RunSpec, root: Path, threads: int = 0, *, seed: int | None = None) -> None:
        self.spec = spec
        self.root = Path(root)
        self.generation = generation_settings(spec)
        self.tokenizer = load_tokenizer(spec, self.root)
        graph = self.root / (self.generation.decoder or spec.entrypoint)
        with_past = self.root / self.generation.decoder_with_past if self.generation.decoder_with_past else None
        for path in (graph, with_past):
            if path is not None and not path.is_file():
                raise PipelineError(f"decoder graph {path.name} is missing from the bundle")
        # the manifest lists the entrypoint's inputs: no need to open the graph twice to pick the loop
        known = {t.name for t in spec.io.inputs} if graph.name == Path(spec.entrypoint).name else None
        self.decoder = decoder_for(
            graph, with_past, self.generation, threads, genai_shares_buffer(self.root), known or None
        )
        self.picker = TokenPicker(self.generation, seed)
        self.eos = set(self.generation.eos_token_id)
        self.context = spec.preprocess.max_length

    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.generation.bos_token_id)

    def token_ids(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """Generated ids for already tokenized ``prompt_ids`` that fit the context (the loop itself)."""
        check_context(list(prompt_ids), max_new_tokens, self.context)
        return self.decoder.tokens(list(prompt_ids), max_new_tokens, self.picker, self.eos)

    def close(self) -> None:
        self.decoder.close()


def decoder_for(
    graph: Path,
    with_past: Path | None,
    generation: Generation,
    threads: int,
    share_buffer: bool,
    input_names: set[str] | None = None,
) -> KVCacheDecoder | FullSequenceDecoder | SplitCacheDecoder:
    """The loop that fits the decoder graph(s) as exported (see the module docstring)."""
    if with_past is not None:
        return SplitCacheDecoder(graph, with_past, threads)
    names = input_names if input_names is not None else graph_inputs(graph)
    if "use_cache_branch" in names:
        return SplitCacheDecoder(graph, None, threads)
    if not any(n.startswith("past_key_values.") for n in names):
        return FullSequenceDecoder(graph, threads)
    return KVCacheDecoder(graph, generation, threads, share_buffer=share_buffer)

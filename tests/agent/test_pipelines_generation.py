"""The device's generation pipelines: plain onnxruntime loop, onnxruntime-genai, and text2text.

Bundles come from the registry's seeds and exporters (built once per module); the pipelines under test
use only onnxruntime, numpy and tokenizers. Random weights give arbitrary but deterministic tokens, so
EOS behaviour is tested by declaring as EOS a token the model is known to produce.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.inference.pipelines import PipelineError, load_pipeline
from agent.inference.pipelines.genai import GenaiGenerationPipeline
from agent.inference.pipelines.generation import (
    DecoderGenerationPipeline,
    IncrementalDecoder,
    Prompt,
    TokenPicker,
    TokenStreamPipeline,
    fit_context,
)
from agent.inference.session import InputError
from benchmarks.seeds import build_seed
from controller.registry.convert import ExportedBundle
from controller.registry.convert.hf_decoders import export_decoder
from controller.registry.convert.hf_t5 import export_t5
from wire.manifest import Generation, RunSpec, Runtime

pytest.importorskip("torch")

PROMPTS = ("The pump reports 温度 café 🚀 again.", "Hello", "δεδομένα from the 传感器: 4.2 °C")
KINDS = ("plain-gptj", "plain-llama", "genai-llama", "genai-graph-plain-loop", "t5")


def _pipeline(spec: RunSpec, root: Path) -> TokenStreamPipeline:
    """``load_pipeline`` typed as what the generation pipelines all are."""
    pipe = load_pipeline(spec, root)
    assert isinstance(pipe, TokenStreamPipeline)
    return pipe


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportedBundle]:
    root = tmp_path_factory.mktemp("generation")
    llama = build_seed("llama-small", root / "llama")
    gptj = build_seed("gpt-j-small", root / "gptj")
    t5 = build_seed("t5-small", root / "t5")
    genai = export_decoder(llama, root / "llama-genai", runtime="onnxruntime-genai")
    return {
        "plain-gptj": export_decoder(gptj, root / "gptj-plain"),
        "plain-llama": export_decoder(llama, root / "llama-plain", runtime="onnxruntime"),
        "genai-llama": genai,
        # The builder's graph keeps the decoder.onnx contract: the agent's own loop runs it too.
        "genai-graph-plain-loop": replace(genai, spec=genai.spec.model_copy(update={"runtime": Runtime.ONNXRUNTIME})),
        "t5": export_t5(t5, root / "t5-onnx"),
    }


def _key(kind: str) -> str:
    return "text" if kind == "t5" else "prompt"


def _with_generation(bundle: ExportedBundle, **changes: Any) -> RunSpec:
    assert bundle.spec.generation is not None
    return bundle.spec.model_copy(update={"generation": bundle.spec.generation.model_copy(update=changes)})


def test_load_pipeline_picks_the_pipeline_for_the_runtime(bundles: dict[str, ExportedBundle]) -> None:
    expected = {
        "plain-gptj": "DecoderGenerationPipeline",
        "plain-llama": "DecoderGenerationPipeline",
        "genai-llama": "GenaiGenerationPipeline",
        "genai-graph-plain-loop": "DecoderGenerationPipeline",
        "t5": "Text2TextPipeline",
    }
    for kind, name in expected.items():
        pipe = load_pipeline(bundles[kind].spec, bundles[kind].root)
        assert type(pipe).__name__ == name
        pipe.close()


@pytest.mark.parametrize("kind", KINDS)
def test_stream_pieces_add_up_to_the_run_text(bundles: dict[str, ExportedBundle], kind: str) -> None:
    bundle = bundles[kind]
    pipe = _pipeline(bundle.spec, bundle.root)
    pipe.warmup()
    for prompt in PROMPTS:
        record = {_key(kind): prompt, "max_new_tokens": 20}
        result = pipe.run([record])[0]
        pieces = list(pipe.stream(record))
        assert "".join(pieces) == result["text"]
        assert result["tokens"] == 20  # random seeds do not produce their EOS this early
        assert len(pieces) > 1 and all(pieces)
    pipe.close()


@pytest.mark.parametrize("kind", KINDS)
def test_generation_stops_at_eos(bundles: dict[str, ExportedBundle], kind: str) -> None:
    bundle = bundles[kind]
    key = _key(kind)
    free = _pipeline(bundle.spec, bundle.root).generate({key: PROMPTS[0], "max_new_tokens": 12})
    ids = free.token_ids
    assert len(ids) == 12 and free.finish_reason == "length"
    # Declare as EOS the first token that was not produced before it: generation must stop right there.
    stop = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    spec = _with_generation(bundle, eos_token_id=[ids[stop]])
    pipe = _pipeline(spec, bundle.root)
    out = pipe.generate({key: PROMPTS[0], "max_new_tokens": 12})
    assert out.token_ids == ids[: stop + 1]
    assert out.finish_reason == "eos"
    assert out.text == pipe.tokenizer.decode(ids[:stop], skip_special_tokens=True)
    result = pipe.run([{key: PROMPTS[0], "max_new_tokens": 12}])[0]
    assert result == {"text": out.text, "tokens": stop + 1, "token_ids": ids[: stop + 1], "finish_reason": "eos"}
    assert "".join(pipe.stream({key: PROMPTS[0], "max_new_tokens": 12})) == out.text


@pytest.mark.parametrize("kind", ["plain-gptj", "genai-llama", "t5"])
def test_max_new_tokens_from_the_record_or_the_manifest(bundles: dict[str, ExportedBundle], kind: str) -> None:
    bundle = bundles[kind]
    key = _key(kind)
    pipe = _pipeline(_with_generation(bundle, max_new_tokens=7), bundle.root)
    assert pipe.run([{key: "hello"}])[0]["tokens"] == 7
    assert pipe.run([{key: "hello", "max_new_tokens": 3}])[0]["tokens"] == 3
    for bad in (0, -1, "3", True, 10**6, 2.5):
        with pytest.raises(InputError, match="max_new_tokens"):
            pipe.run([{key: "hello", "max_new_tokens": bad}])
    with pytest.raises(InputError):
        pipe.run([{"other": "hello"}])
    with pytest.raises(InputError):
        list(pipe.stream({key: 42}))
    records: list[Any] = [{key: "hello", "max_new_tokens": 2}, {key: None}, "not a record", {key: "bye"}]
    batch = pipe.run(records)
    assert batch[0]["tokens"] == 2 and batch[3]["tokens"] == 7
    assert "error" in batch[1] and "error" in batch[2]


def test_plain_loop_on_the_genai_graph_matches_genai_and_writes_the_cache_in_place(
    bundles: dict[str, ExportedBundle],
) -> None:
    genai = bundles["genai-llama"]
    loop = DecoderGenerationPipeline(bundles["genai-graph-plain-loop"].spec, genai.root)
    native = GenaiGenerationPipeline(genai.spec, genai.root)
    assert loop.decoder.share_buffer is True
    assert native.fallback is None
    for prompt in PROMPTS:
        ids = native.encode(prompt)
        assert list(loop.token_ids(ids, 24)) == list(native.token_ids(ids, 24))
    traced = DecoderGenerationPipeline(bundles["plain-llama"].spec, bundles["plain-llama"].root)
    assert traced.decoder.share_buffer is False
    # Llama's tokenizer adds <s>: the same ids on both runtimes (onnxruntime-genai's own tokenizer would not).
    assert native.encode("hello")[0] == 1 == traced.encode("hello")[0]


def test_genai_pipeline_falls_back_to_the_plain_loop_without_onnxruntime_genai(
    bundles: dict[str, ExportedBundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    genai = bundles["genai-llama"]
    expected = GenaiGenerationPipeline(genai.spec, genai.root).generate({"prompt": PROMPTS[0], "max_new_tokens": 10})
    # A device without the package: the import fails.
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    pipe = GenaiGenerationPipeline(genai.spec, genai.root)
    assert pipe.fallback is not None
    assert pipe.generate({"prompt": PROMPTS[0], "max_new_tokens": 10}).token_ids == expected.token_ids


def test_sampling_settings_from_the_manifest(bundles: dict[str, ExportedBundle]) -> None:
    bundle = bundles["plain-gptj"]
    record = {"prompt": PROMPTS[0], "max_new_tokens": 16}
    greedy = _pipeline(bundle.spec, bundle.root).generate(record).token_ids
    top1 = DecoderGenerationPipeline(_with_generation(bundle, do_sample=True, top_k=1), bundle.root, seed=3)
    assert top1.generate(record).token_ids == greedy
    hot = _with_generation(bundle, do_sample=True, temperature=5.0, top_k=0)
    first = DecoderGenerationPipeline(hot, bundle.root, seed=7).generate(record).token_ids
    again = DecoderGenerationPipeline(hot, bundle.root, seed=7).generate(record).token_ids
    assert first == again  # seeded: reproducible
    assert first != greedy  # near-uniform over 8192 tokens: 16 greedy picks in a row would be a bug


def test_token_picker_top_k_only_picks_among_the_k_best() -> None:
    logits = np.asarray([0.0, 5.0, 4.0, -1.0, 3.0], dtype=np.float32)
    picker = TokenPicker(Generation(do_sample=True, top_k=2, temperature=10.0), seed=0)
    assert {picker(logits) for _ in range(200)} == {1, 2}
    assert TokenPicker(Generation())(logits) == 1


def test_incremental_decoder_waits_for_whole_characters(bundles: dict[str, ExportedBundle]) -> None:
    tokenizer = _pipeline(bundles["plain-gptj"].spec, bundles["plain-gptj"].root).tokenizer
    # A character the tokenizer never saw: byte-level BPE spells it with one token per UTF-8 byte.
    ids = tokenizer.encode("aꙮb").ids
    assert len(ids) == 5
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(i) for i in ids] == ["a", "", "", "ꙮ", "b"]
    assert decoder.finish() == ""
    # A character cut short stays out of the stream until finish() shows what decode() gives.
    cut = IncrementalDecoder(tokenizer)
    assert [cut.push(i) for i in ids[:3]] == ["a", "", ""]
    assert "a" + cut.finish() == tokenizer.decode(ids[:3])
    assert "".join(cut.emitted) == tokenizer.decode(ids[:3])


def test_incremental_decoder_keeps_sentencepiece_spaces(bundles: dict[str, ExportedBundle]) -> None:
    tokenizer = _pipeline(bundles["t5"].spec, bundles["t5"].root).tokenizer
    text = "the pump reports again"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.finish() == tokenizer.decode(ids) == text
    assert sum(1 for p in pieces if p.startswith(" ")) == 3


def test_a_prompt_over_the_context_is_refused_with_the_limit_or_cut_only_when_asked(
    bundles: dict[str, ExportedBundle],
) -> None:
    ids = list(range(10))
    # the manifest's default length shrinks to the room left; an explicit one that does not fit is refused
    assert fit_context(ids[:3], Prompt("", 50, explicit=False, truncate=False), 8) == ([0, 1, 2], 5, False)
    with pytest.raises(InputError, match="context of 8 tokens; ask for at most 5"):
        fit_context(ids[:3], Prompt("", 50, explicit=True, truncate=False), 8)
    with pytest.raises(InputError, match="the prompt is 10 tokens, over the model's context of 8"):
        fit_context(ids, Prompt("", 4, explicit=False, truncate=False), 8)
    assert fit_context(ids, Prompt("", 4, explicit=True, truncate=True), 8) == ([6, 7, 8, 9], 4, True)
    bundle = bundles["plain-llama"]
    spec = bundle.spec.model_copy(update={"preprocess": bundle.spec.preprocess.model_copy(update={"max_length": 24})})
    pipe = _pipeline(spec, bundle.root)
    long_prompt = " ".join(["sensor"] * 100)
    assert len(pipe.encode(long_prompt)) > 24
    with pytest.raises(InputError, match="context of 24 tokens"):
        pipe.run([{"prompt": long_prompt, "max_new_tokens": 8}])
    cut = pipe.run([{"prompt": long_prompt, "max_new_tokens": 8, "truncate": True}])[0]
    assert cut["tokens"] == 8 and cut["truncated"] is True and len(cut["token_ids"]) == 8
    # never the silent cut to the prompt's last token: max_new_tokens over the context is refused
    with pytest.raises(InputError, match="ask for at most"):
        pipe.run([{"prompt": "sensor", "max_new_tokens": 30}])


def test_bundle_problems_are_pipeline_errors(bundles: dict[str, ExportedBundle], tmp_path: Path) -> None:
    bundle = bundles["plain-gptj"]
    no_generation = bundle.spec.model_copy(update={"generation": None})
    with pytest.raises(PipelineError, match="generation"):
        load_pipeline(no_generation, bundle.root)
    missing = bundle.spec.model_copy(
        update={"preprocess": bundle.spec.preprocess.model_copy(update={"tokenizer": "x.json"})}
    )
    with pytest.raises(PipelineError, match="tokenizer"):
        _pipeline(missing, bundle.root)
    with pytest.raises(PipelineError, match="missing"):
        _pipeline(_with_generation(bundle, decoder="nope.onnx"), bundle.root)
    with pytest.raises(PipelineError, match="genai_config.json"):
        GenaiGenerationPipeline(bundle.spec, bundle.root)
    with pytest.raises(PipelineError, match="decoder_start_token_id"):
        _pipeline(_with_generation(bundles["t5"], decoder_start_token_id=None), bundles["t5"].root)


def test_device_pipelines_run_without_torch_or_transformers(bundles: dict[str, ExportedBundle]) -> None:
    """What a device does: a fresh interpreter with the agent code only, one generation per pipeline."""
    jobs = [
        {"spec": bundles[k].spec.model_dump(mode="json"), "root": str(bundles[k].root), "key": _key(k)}
        for k in ("plain-gptj", "genai-llama", "t5")
    ]
    script = (
        "import json, sys\n"
        "from agent.inference.pipelines import load_pipeline\n"
        "from wire.manifest import RunSpec\n"
        "out = []\n"
        "for job in json.loads(sys.argv[1]):\n"
        "    pipe = load_pipeline(RunSpec.model_validate(job['spec']), job['root'])\n"
        "    out.append(pipe.run([{job['key']: 'hello', 'max_new_tokens': 4}])[0]['tokens'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(json.dumps({'tokens': out, 'heavy': heavy}))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(jobs)], capture_output=True, text=True, cwd=repo, check=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"tokens": [4, 4, 4], "heavy": []}

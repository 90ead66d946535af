"""Build the agent benchmark's bundles in a process of their own (torch's threads stay out of the
measurements): ``python -m benchmarks.tools.agent_bundles OUT_DIR`` prints ``{name: bundle dir}``.

MiniLM (real weights, embeddings) and DistilBERT (real size, random weights, classification), each as
fp32 and int8, plus the llama-small generation seed built by onnxruntime-genai's model builder. Every
bundle gets a ``slmfleet.json`` run spec, the form ``slmfleet agent --model DIR`` serves.
``python -m benchmarks.tools.agent_bundles OUT_DIR minilm`` builds MiniLM's two only (``benchmarks device``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from benchmarks.seeds import build_seed
from benchmarks.seeds.encoders import minilm_checkpoint
from controller.registry.convert import ExportedBundle, export_hf
from controller.registry.convert.quantize_int8 import quantize_int8
from wire.manifest import Task


def _write(bundle: ExportedBundle) -> str:
    (bundle.root / "slmfleet.json").write_text(bundle.spec.model_dump_json())
    return str(bundle.root)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    out = Path(sys.argv[1])
    made: dict[str, str] = {}
    minilm = export_hf(minilm_checkpoint(), Task.EMBEDDINGS, out / "minilm-fp32")
    made["minilm-fp32"] = _write(minilm)
    made["minilm-int8"] = _write(quantize_int8(minilm, out / "minilm-int8"))
    if sys.argv[2:] == ["minilm"]:
        print(json.dumps(made))
        return
    checkpoint = build_seed("distilbert", out / "distilbert-checkpoint", task="text-classification")
    distilbert = export_hf(checkpoint, Task.TEXT_CLASSIFICATION, out / "distilbert-fp32")
    made["distilbert-fp32"] = _write(distilbert)
    made["distilbert-int8"] = _write(quantize_int8(distilbert, out / "distilbert-int8"))
    llama = build_seed("llama-small", out / "llama-checkpoint", max_new_tokens=64)
    genai = export_hf(llama, Task.TEXT_GENERATION, out / "llama-genai", runtime="onnxruntime-genai")
    made["llama-genai"] = _write(genai)
    print(json.dumps(made))


if __name__ == "__main__":
    main()

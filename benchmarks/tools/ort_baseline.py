"""The baselines of the agent benchmark, each in a fresh interpreter like the agent process.

``python -m benchmarks.tools.ort_baseline encoder BUNDLE TEXTS MAX_BATCH THREADS``: bare
``session.run`` over the same tensors the agent's pipeline feeds (same tokenizer, same batches, same
padding), prepared before the clock starts, after one untimed pass over all of them; also the time with
tokenization included.

``python -m benchmarks.tools.ort_baseline genai BUNDLE PROMPTS MAX_NEW_TOKENS THREADS``:
onnxruntime-genai's own generation loop on the same prompt ids the agent uses (after an untimed pass).

Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from wire.manifest import RunSpec


def encoder(bundle: Path, texts: list[str], max_batch: int, threads: int) -> dict[str, Any]:
    from agent.inference.pipelines.tokenize import length_batches, rows_interact, text_encoder
    from agent.inference.session import load_session

    spec = RunSpec.model_validate_json((bundle / "slmfleet.json").read_text())
    graph = bundle / spec.entrypoint
    session = load_session(graph, threads)
    encoder = text_encoder(spec, bundle, [i.name for i in session.get_inputs()])
    output = [spec.io.outputs[0].name]
    # The agent hands the pipeline micro-batches of max_batch records; the pipeline sorts each by length
    # and runs sub-batches (one row at a time for dynamic-int8 graphs, whose rows would interact).
    per_run = 1 if rows_interact(graph) else 32
    chunks = [texts[i : i + max_batch] for i in range(0, len(texts), max_batch)]
    feeds = [batch for chunk in chunks for _, batch in length_batches(encoder.encode(chunk), per_run)]
    for batch in feeds:  # a warm pass over every shape, as the agent gets one (see benchmarks/agent.py)
        session.run(output, batch)
    started, cpu = time.perf_counter(), time.process_time()
    for batch in feeds:
        session.run(output, batch)
    bare, bare_cpu = time.perf_counter() - started, time.process_time() - cpu
    started, cpu = time.perf_counter(), time.process_time()
    for chunk in chunks:
        for _, batch in length_batches(encoder.encode(chunk), per_run):
            session.run(output, batch)
    tokenized, tokenized_cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "records_per_s": len(texts) / bare,
        "with_tokenizer_records_per_s": len(texts) / tokenized,
        # CPU time of every thread of the process: what the work costs, whoever else uses the machine
        "cpu_ms_per_record": 1000 * bare_cpu / len(texts),
        "with_tokenizer_cpu_ms_per_record": 1000 * tokenized_cpu / len(texts),
        "session_runs": len(feeds),
        "rows_per_run": per_run,
    }


def genai(bundle: Path, prompts: list[str], max_new_tokens: int, threads: int) -> dict[str, Any]:
    import numpy as np
    import onnxruntime_genai as og

    from agent.inference.pipelines.generation import encode_prompt, load_tokenizer

    spec = RunSpec.model_validate_json((bundle / "slmfleet.json").read_text())
    tokenizer = load_tokenizer(spec, bundle)
    bos = spec.generation.bos_token_id if spec.generation else None
    config = og.Config(str(bundle))
    if threads > 0:
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    encoded = [encode_prompt(tokenizer, p, bos) for p in prompts]

    def generate(ids: list[int], limit: int) -> int:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + limit, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        produced = 0
        while not generator.is_done() and produced < limit:
            generator.generate_next_token()
            generator.get_next_tokens()
            produced += 1
        return produced

    for ids in encoded:  # a warm pass, as the agent gets one
        generate(ids, max_new_tokens)
    tokens = 0
    started, cpu = time.perf_counter(), time.process_time()
    for ids in encoded:
        tokens += generate(ids, max_new_tokens)
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    return {"tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu_s, "tokens": tokens}


def main() -> None:
    kind, bundle, data, number, threads = sys.argv[1:6]
    lines = Path(data).read_text().splitlines()
    if kind == "encoder":
        result = encoder(Path(bundle), lines, int(number), int(threads))
    else:
        result = genai(Path(bundle), lines, int(number), int(threads))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

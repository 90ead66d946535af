"""Agreement floors from measurements: working variants against deliberately broken ones, per kind of agreement.

For each task the registry's own evaluator (``controller.registry.convert.evaluate``, what an import runs)
compares variants with their fp32 reference:

* working: int8 and int4 as the registry builds them, of real weights (all-MiniLM-L6-v2), of models trained
  here (a small GPT-2 on the seed corpus, a sensor autoencoder), of the exporters' fixtures and of seed
  families at real size (random weights);
* broken: the same graph with its weights scrambled (each tensor's values permuted: same shapes, same
  distribution, no structure), with fresh random weights of the same scale, and with its embedding tables
  zeroed (the output no longer depends on the input: a collapsed model);
* degraded, shown beside them: 2-bit weights (MatMulNBits with 2 bits), which destroys the output of
  models whose weights matter (real and trained ones) and barely touches tiny random ones; and int8 of the
  models with outliers (``with_outliers``), which their size hurts on some models and not on others.

The floors in ``controller.registry.importer.DEFAULT_FLOORS`` sit between the lowest working and the highest
broken value of each kind, with a margin on both sides; this benchmark prints every value, the gap and
whether each floor separates them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "tests" / "fixtures" / "exporters"
BROKEN = ("scrambled", "random", "constant")
DEGRADED = ("int2",)


INT = ("int8", "int4")


@dataclass
class Case:
    name: str
    what: str
    build: Callable[[Path], tuple[Any, list[dict[str, Any]] | None]]
    good: tuple[str, ...]
    #: part of ``--quick`` (no training, small models: a smoke run of a few minutes)
    quick: bool = False
    #: also measure the model ``with_outliers``: its int8 works, its int4 is destroyed
    outliers: bool = False


# ---------------------------------------------------------------------------------------- broken copies --


def broken_copy(bundle: Any, mode: str, out: Path, seed: int = 0) -> Any:
    """A copy of ``bundle`` in ``out`` whose weights are broken as ``mode`` says (see the module docstring)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from controller.registry.convert.weights import graphs_in as _graphs

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    graphs = [p for p in bundle.files() if p.suffix == ".onnx"]
    for rel in bundle.files():
        if rel.suffix != ".onnx" and not rel.name.endswith((".onnx.data", ".onnx_data")):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle.root / rel, out / rel)
    for rel in graphs:
        model = onnx.load(str(bundle.root / rel))
        if mode == "int2":
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            from controller.registry.convert.weights import gemm_to_matmul

            gemm_to_matmul(model)
            quantizer = MatMulNBitsQuantizer(
                model, bits=2, block_size=32, is_symmetric=True, accuracy_level=4, op_types_to_quantize=("MatMul",)
            )
            quantizer.process()
            model = quantizer.model.model
        else:
            # "constant": the embedding tables (a Gather's data) zeroed, or every weight where there is none
            tables = {n.input[0] for g in _graphs(model.graph) for n in g.node if n.op_type == "Gather"}
            for tensor in _initializers(model.graph):
                if tensor.data_type != onnx.TensorProto.FLOAT or int(np.prod(tensor.dims)) < 16:
                    continue
                array = numpy_helper.to_array(tensor)
                if mode == "scrambled":
                    new = rng.permutation(array.reshape(-1)).reshape(array.shape)
                elif mode == "random":
                    new = rng.normal(float(array.mean()), float(array.std()) or 1.0, array.shape)
                elif mode == "constant":
                    if tables and tensor.name not in tables:
                        continue
                    new = np.zeros_like(array)
                else:
                    raise ValueError(mode)
                tensor.CopyFrom(numpy_helper.from_array(new.astype(np.float32), tensor.name))
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        big = model.ByteSize() > 1_500_000_000
        onnx.save(model, str(target), save_as_external_data=big, location=target.name + ".data" if big else None)
    keep = None
    if bundle.keep is not None:
        keep = [p.as_posix() for p in sorted(out.rglob("*")) if p.is_file()]
        keep = [str(Path(p).relative_to(out)) for p in keep]
    return replace(bundle, root=out, keep=keep)


def with_outliers(bundle: Any, out: Path, factor: float = 16.0, block: int = 32) -> Any:
    """A copy of ``bundle`` whose int4 variant is destroyed while fp32 (and int8) keep working.

    Every layer fed by a LayerNormalization gets, in one input channel per block of ``block`` rows, a weight
    ``factor`` times the layer's largest, and the LayerNormalization's scale and bias are zeroed on those
    channels, so fp32 computes nothing with them (0 x outlier). Quantization does not know that: int4's
    blocks of 32 along the input take their scale from the outlier (7 levels for ``factor`` x the largest
    weight), so every other weight of the layer rounds to 0; int8's per-channel scale has 127 levels and keeps
    them. Large outlier weights are what real models show (the reason int8 papers keep outlier features
    apart); here they sit where fp32 ignores them, so the model is unchanged except for the dropped channels.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    out.mkdir(parents=True, exist_ok=True)
    for rel in bundle.files():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.suffix != ".onnx":
            shutil.copy2(bundle.root / rel, out / rel)
            continue
        model = onnx.load(str(bundle.root / rel))
        graph = model.graph
        tensors = {t.name: t for t in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}
        for node in graph.node:
            if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
                continue
            weight = tensors.get(node.input[1])
            source = producer.get(node.input[0])
            while source is not None and source.op_type in ("Reshape", "Cast", "Identity"):
                source = producer.get(source.input[0])
            if weight is None or len(weight.dims) != 2 or source is None or source.op_type != "LayerNormalization":
                continue
            w = numpy_helper.to_array(weight).copy()
            transposed = any(a.name == "transB" and a.i for a in node.attribute)
            rows = range(0, w.shape[1] if transposed else w.shape[0], block)
            big = factor * float(np.abs(w).max())
            for c in rows:
                if transposed:
                    w[:, c] = big
                else:
                    w[c, :] = big
            weight.CopyFrom(numpy_helper.from_array(w, weight.name))
            for name in source.input[1:3]:
                if name in tensors:
                    norm = numpy_helper.to_array(tensors[name]).copy()
                    norm[list(rows)] = 0.0
                    tensors[name].CopyFrom(numpy_helper.from_array(norm, name))
        onnx.save(model, str(out / rel))
    return replace(bundle, root=out)


def _initializers(graph: Any) -> Any:
    from controller.registry.convert.weights import graphs_in

    for g in graphs_in(graph):
        yield from g.initializer


# ------------------------------------------------------------------------------------------- the models --


def _fixture(name: str, task: str | None = None) -> Callable[[Path], tuple[Any, None]]:
    def build(work: Path) -> tuple[Any, None]:
        from controller.registry.bundles import ImportOptions
        from controller.registry.layouts import inspect_bundle

        root = work / name
        shutil.copytree(FIXTURES / name, root)
        options = ImportOptions(task=task) if task else ImportOptions()
        return inspect_bundle(root, options).bundle, None

    return build


def _seed(name: str, task: str, eval_set: Callable[[], list[dict[str, Any]]] | None = None) -> Any:
    def build(work: Path) -> tuple[Any, list[dict[str, Any]] | None]:
        from benchmarks.seeds import ENCODER_SEEDS, build_seed
        from benchmarks.seeds.encoders import minilm_checkpoint
        from controller.registry.convert import export_hf
        from wire.manifest import Task

        if name == "minilm":
            checkpoint = minilm_checkpoint()
        else:
            options = {"task": task} if name in ENCODER_SEEDS else {}
            checkpoint = build_seed(name, work / "seed", **options)
        return export_hf(checkpoint, Task(task), work / "fp32"), eval_set() if eval_set else None

    return build


def _minilm_sentences() -> list[dict[str, Any]]:
    from benchmarks.seeds.sentences import text_records

    return text_records(300)


def _trained_gpt2(work: Path) -> tuple[Any, list[dict[str, Any]]]:
    """A small GPT-2 trained here on the seed corpus: real logit margins, unlike random weights."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from benchmarks.seeds.decoders import generate_corpus, train_tokenizer
    from controller.registry.convert import export_hf
    from wire.manifest import Task

    torch.manual_seed(0)
    raw = train_tokenizer("gpt-j-small", 2048)
    end = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=end, eos_token=end, unk_token=end, pad_token=end, model_max_length=128
    )
    eos = tokenizer.convert_tokens_to_ids(end)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=128, n_layer=2, n_head=4, bos_token_id=eos, eos_token_id=eos
    )
    model = GPT2LMHeadModel(config)
    corpus = generate_corpus(4000, seed=1)
    ids: list[int] = []
    for sentence in corpus:
        ids += tokenizer(sentence)["input_ids"] + [eos]
    data = torch.tensor(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    steps, batch, length = 300, 16, 64
    for _ in range(steps):
        starts = torch.randint(0, len(data) - length - 1, (batch,))
        x = torch.stack([data[s : s + length] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    log.warning("trained gpt-2 (%d parameters): loss %.2f after %d steps", model.num_parameters(), loss.item(), steps)
    model.eval()
    ckpt = work / "trained-gpt2"
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, max_new_tokens=32)
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    prompts = [{"prompt": " ".join(s.split()[:4])} for s in generate_corpus(24, seed=7)]
    return export_hf(ckpt, Task.TEXT_GENERATION, work / "fp32"), prompts


#: words that make a sentence of the seed corpus positive or negative (the trained classifier's rule)
_POSITIVE = frozenset(
    ("good", "great", "excellent", "wonderful", "amazing", "perfect", "decent", "happy", "pleased", "satisfied")
)
_NEGATIVE = frozenset(
    ("bad", "poor", "terrible", "awful", "horrible", "useless", "angry", "annoyed", "disappointed", "worried")
)


def sentiment(text: str) -> int:
    """0 negative, 1 neutral, 2 positive: which kind of word the text has more of."""
    words = [w.strip(".,!?").lower() for w in text.split()]
    score = sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)
    return 1 if score == 0 else (2 if score > 0 else 0)


def _trained_classifier(work: Path) -> tuple[Any, None]:
    """BERT tiny's shape (2 layers, 128) trained here to tell positive, neutral and negative sentences apart."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from benchmarks.seeds.encoders import bert_tokenizer, encoder_config, generate_corpus
    from controller.registry.convert import export_hf
    from wire.manifest import Task

    torch.manual_seed(0)
    config = encoder_config("bert-tiny")
    config.vocab_size = 2000
    tokenizer = bert_tokenizer(2000, 0, config.max_position_embeddings)
    model = AutoModelForSequenceClassification.from_config(config)
    texts = generate_corpus(6000, seed=3)
    labels = torch.tensor([sentiment(t) for t in texts])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    steps = 200
    for _ in range(steps):
        pick = torch.randint(0, len(texts), (32,))
        batch = tokenizer([texts[i] for i in pick], padding=True, truncation=True, max_length=32, return_tensors="pt")
        loss = model(**batch, labels=labels[pick]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = generate_corpus(400, seed=4)
    with torch.no_grad():
        batch = tokenizer(held_out, padding=True, truncation=True, max_length=32, return_tensors="pt")
        predicted = model(**batch).logits.argmax(-1).tolist()
    accuracy = sum(p == sentiment(t) for p, t in zip(predicted, held_out, strict=True)) / len(held_out)
    log.warning("trained classifier: loss %.3f, held-out accuracy %.3f after %d steps", loss.item(), accuracy, steps)
    ckpt = work / "trained-classifier"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    return export_hf(ckpt, Task.TEXT_CLASSIFICATION, work / "fp32"), None


def _autoencoder(work: Path) -> tuple[Any, None]:
    from benchmarks.seeds.encoders import build_anomaly_model

    return build_anomaly_model(work / "fp32", kind="autoencoder"), None


CASES = (
    Case(
        "minilm", "all-MiniLM-L6-v2 (real weights)", _seed("minilm", "embeddings", _minilm_sentences), INT, True, True
    ),
    Case("st-cls", "sentence-transformers fixture", _fixture("sentence-transformers-cls"), INT, True),
    Case("trained-classifier", "BERT tiny trained here", _trained_classifier, INT, outliers=True),
    Case("bert-tiny", "BERT tiny seed (random)", _seed("bert-tiny", "text-classification"), INT),
    Case("bert-mini", "BERT mini seed (random)", _seed("bert-mini", "text-classification"), INT),
    Case("optimum-bert", "optimum BERT classifier fixture", _fixture("optimum-bert-classifier"), INT, True),
    Case("trained-gpt2", "GPT-2 trained here (2 layers, 128)", _trained_gpt2, INT, outliers=True),
    Case("optimum-gpt2", "optimum GPT-2 fixture", _fixture("optimum-gpt2-legacy"), INT, True),
    Case("optimum-t5", "optimum T5 fixture", _fixture("optimum-t5"), INT),
    Case("genai-llama", "onnxruntime-genai Llama fixture", _fixture("genai-llama"), INT),
    Case("gpt-j-small", "GPT-J seed, 4 layers (random)", _seed("gpt-j-small", "text-generation"), INT),
    Case("llama-small", "Llama seed, 4 layers (random; genai)", _seed("llama-small", "text-generation"), INT),
    Case("phi-small", "Phi seed, 4 layers (random; genai)", _seed("phi-small", "text-generation"), INT),
    Case("t5-small", "T5-small seed (random)", _seed("t5-small", "text2text"), INT),
    Case("gpt-neo-125m", "GPT-Neo 125M seed (random)", _seed("gpt-neo-125m", "text-generation"), INT),
    Case("autoencoder", "sensor autoencoder seed (trained)", _autoencoder, ("int8",), True),
)


def _measure(reference: Any, candidate: Any, samples: list[dict[str, Any]] | None) -> Any:
    """The registry's own measurement (latency and memory of encoders skipped: not needed here)."""
    from controller.registry.convert.evaluate_encoders import evaluate_encoder
    from controller.registry.convert.evaluate_generation import evaluate_generation
    from wire.manifest import Task

    if reference.spec.task in (Task.TEXT_GENERATION, Task.TEXT2TEXT):
        return evaluate_generation(reference, candidate, samples)
    return evaluate_encoder(reference, candidate, samples, measure_resources=False)


def _variants(case: Case, reference: Any, work: Path) -> list[tuple[str, str, Any]]:
    """(name, group, builder) of every candidate measured for ``case``."""
    from controller.registry.bundles import QUANTIZATION_OF
    from controller.registry.convert import quantize

    out: list[tuple[str, str, Any]] = [
        (v, "working", lambda v=v: quantize(reference, QUANTIZATION_OF[v], work / v)) for v in case.good
    ]
    out += [(v, "broken", lambda v=v: broken_copy(reference, v, work / v)) for v in BROKEN]
    out += [(v, "degraded", lambda v=v: broken_copy(reference, v, work / v)) for v in DEGRADED]
    return out


def _measure_case(case: Case, work: Path) -> list[dict[str, Any]]:
    from controller.registry.bundles import QUANTIZATION_OF
    from controller.registry.convert import quantize

    reference, samples = case.build(work)
    plans = [(reference, _variants(case, reference, work), "")]
    if case.outliers:
        shifted = with_outliers(reference, work / "outliers")
        plans.append(
            (
                shifted,
                [
                    # int8 keeps 127 levels: it survives small outliers, not these on every model (shown)
                    ("int8", "degraded", lambda: quantize(shifted, QUANTIZATION_OF["int8"], work / "outliers-int8")),
                    ("int4", "broken", lambda: quantize(shifted, QUANTIZATION_OF["int4"], work / "outliers-int4")),
                ],
                " (outliers)",
            )
        )
    rows: list[dict[str, Any]] = []
    for base, variants, suffix in plans:
        for variant, group, build in variants:
            row: dict[str, Any] = {"case": case.name + suffix, "what": case.what, "variant": variant, "group": group}
            try:
                metrics = _measure(base, build(), samples)
            except Exception as exc:  # a broken graph may not even run: that is a measurement too
                log.warning("%s %s: %s", row["case"], variant, exc)
                rows.append(row | {"error": str(exc)[:300]})
                continue
            row |= {"kind": metrics.agreement_kind, "agreement": round(metrics.agreement, 4)}
            for field in ("free_running_agreement", "score_correlation"):
                value = getattr(metrics, field)
                if value is not None:
                    row[field] = round(value, 4)
            rows.append(row)
            log.warning("%s %s: %s", row["case"], variant, {k: v for k, v in row.items() if k not in ("what", "case")})
    return rows


def summarize(rows: list[dict[str, Any]], floors: dict[str, float]) -> dict[str, Any]:
    """Per measure: the lowest working value per variant, the highest broken one, the floor, and whether the
    floor sits between them; which degraded variants the floor refuses and which it keeps."""
    from controller.registry.importer import floor_for

    summary: dict[str, Any] = {}
    measures = [(k, "agreement", k) for k in sorted({r["kind"] for r in rows if r.get("kind")})]
    measures.append(("score-correlation", "score_correlation", None))
    for name, field, kind in measures:
        of_kind = [r for r in rows if field in r and (kind is None or r.get("kind") == kind)]
        if not of_kind:
            continue
        broken = [r for r in of_kind if r["group"] == "broken"]
        worst = max(broken, key=lambda r: r[field], default=None)
        entry: dict[str, Any] = {
            "highest_broken": worst[field] if worst else None,
            "highest_broken_case": f"{worst['case']} {worst['variant']}" if worst else None,
        }
        for variant in sorted({r["variant"] for r in of_kind if r["group"] == "working"}):
            working = [r for r in of_kind if r["group"] == "working" and r["variant"] == variant]
            lowest = min(working, key=lambda r: r[field])
            floor = floor_for(floors, name, variant) or 0.0
            entry[variant] = {
                "lowest_working": lowest[field],
                "lowest_case": lowest["case"],
                "floor": floor,
                "separates": lowest[field] >= floor > (entry["highest_broken"] or -1.0),
            }
        degraded = [r for r in of_kind if r["group"] == "degraded"]
        refused = [r for r in degraded if r[field] < (floor_for(floors, name, r["variant"]) or 0.0)]
        entry["degraded_refused"] = sorted(f"{r['case']} {r['variant']}" for r in refused)
        entry["degraded_kept"] = sorted(f"{r['case']} {r['variant']}" for r in degraded if r not in refused)
        summary[name] = entry
    summary["verdicts"] = verdicts(rows, floors)
    return summary


def verdicts(rows: list[dict[str, Any]], floors: dict[str, float]) -> dict[str, list[str]]:
    """What the importer's own refusal rule (every floor together) does with each measured variant; broken
    and degraded ones are judged at int4's floors, the most lenient."""
    from controller.registry.importer import Importer
    from wire.manifest import Metrics

    judge = Importer.__new__(Importer)
    judge.floors = dict(floors)
    out: dict[str, list[str]] = {}
    for row in rows:
        if row.get("kind") is None:
            continue
        metrics = Metrics(
            agreement=row["agreement"],
            agreement_kind=row["kind"],
            score_correlation=row.get("score_correlation"),
        )
        variant = row["variant"] if row["group"] == "working" else "int4"
        verdict = "refused" if judge.refusal(metrics, variant) else "kept"
        out.setdefault(f"{row['group']}_{verdict}", []).append(f"{row['case']} {row['variant']}")
    return out


def run(quick: bool = False) -> dict[str, Any]:
    from controller.registry.importer import DEFAULT_FLOORS

    only = {c for c in os.environ.get("SLMFLEET_FLOORS_CASES", "").split(",") if c}
    load = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-floors-") as tmp:
        for case in CASES:
            if (quick and not case.quick) or (only and case.name not in only):
                continue
            started = time.perf_counter()
            rows += _measure_case(case, Path(tmp) / case.name)
            shutil.rmtree(Path(tmp) / case.name, ignore_errors=True)
            log.warning("%s measured in %.0f s", case.name, time.perf_counter() - started)
    return {
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load]},
        "default_floors": DEFAULT_FLOORS,
        "summary": summarize(rows, DEFAULT_FLOORS),
        "measurements": rows,
    }

"""The folders the ecosystem's exporters write, recognised as they are written, and what each needs to run.

=============================== ===================================================== ========================
layout                          files (as the tool writes them)                        task
=============================== ===================================================== ========================
optimum encoder                 model.onnx, config.json, tokenizer.json                config.json architectures
optimum decoder (with past)     model.onnx with past_key_values.*                      text-generation
optimum decoder (no past)       model.onnx without a cache                             text-generation
optimum decoder, two graphs     decoder_model.onnx + decoder_with_past_model.onnx      text-generation
optimum decoder, merged         decoder_model_merged.onnx (use_cache_branch)           text-generation
optimum seq2seq                 encoder_model.onnx + decoder_model[_merged].onnx       text2text
                                (+ decoder_with_past_model.onnx)
sentence-transformers           modules.json, 1_Pooling/config.json, onnx/model.onnx   embeddings
skl2onnx                        one .onnx taking float [batch, features]               anomaly
onnxruntime-genai               genai_config.json, model.onnx(.data), tokenizer.json   text-generation
slmfleet's own                  model.onnx, decoder.onnx, encoder.onnx + decoder.onnx  (as exported)
=============================== ===================================================== ========================

The task comes from the files where they say it (``detect_task``); limits and special token ids from the
configuration files (``hfconfig``); what the operator passes in ``options`` wins. Each bundle keeps only
the files its device needs (``ExportedBundle.keep``): the graphs it runs, their external data, the
tokenizer (and genai_config.json): optimum's ``vocab.txt``, the checkpoint's READMEs and the unused
decoder graphs of a seq2seq export stay on the controller.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.registry.bundles import BundleError, ImportOptions, load_io
from controller.registry.convert import ExportedBundle
from controller.registry.hfconfig import ConfigError, ModelConfig, read_json, read_model_config, task_from_architectures
from wire.manifest import (
    IO,
    Anomaly,
    Generation,
    Postprocess,
    Preprocess,
    RunSpec,
    Runtime,
    Task,
    TensorInfo,
)

log = logging.getLogger(__name__)

#: sentence-transformers' Pooling modes the device pipeline runs, by their config names (old and new format)
_POOLING_MODES = {
    "mean": "mean",
    "cls": "cls",
    "max": "max",
    "lasttoken": "lasttoken",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}
_SECONDS_FLOOR_DEFAULT_CONTEXT = 256


@dataclass
class Layout:
    """Which exporter wrote a folder and which of its graphs play which part."""

    kind: str
    graphs: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.kind} ({', '.join(sorted(set(self.graphs.values())))})" if self.graphs else self.kind


def find_layout(root: Path) -> Layout:
    """The layout of ``root`` (raises BundleError when it holds no graph, or several and no way to choose)."""

    def has(name: str) -> bool:
        return (root / name).is_file()

    if has("genai_config.json"):
        return Layout("onnxruntime-genai")
    if has("modules.json"):
        for graph in ("onnx/model.onnx", "model.onnx"):
            if has(graph):
                return Layout("sentence-transformers", {"model": graph})
        raise BundleError(
            "a sentence-transformers folder without an ONNX graph: export it first, e.g."
            ' SentenceTransformer(path, backend="onnx").save(path) (writes onnx/model.onnx), or'
            " optimum-cli export onnx --library sentence_transformers"
        )
    if has("encoder_model.onnx"):
        graphs = {"encoder": "encoder_model.onnx"}
        if has("decoder_model_merged.onnx"):
            graphs["decoder"] = "decoder_model_merged.onnx"
        elif has("decoder_model.onnx"):
            graphs["decoder"] = "decoder_model.onnx"
            if has("decoder_with_past_model.onnx"):
                graphs["decoder_with_past"] = "decoder_with_past_model.onnx"
        else:
            raise BundleError("an optimum seq2seq export needs decoder_model.onnx (or decoder_model_merged.onnx)")
        return Layout("optimum seq2seq", graphs)
    if has("encoder.onnx") and has("decoder.onnx"):
        return Layout("slmfleet seq2seq", {"encoder": "encoder.onnx", "decoder": "decoder.onnx"})
    if has("decoder_model_merged.onnx"):
        return Layout("optimum decoder, merged", {"decoder": "decoder_model_merged.onnx"})
    if has("decoder_model.onnx"):
        graphs = {"decoder": "decoder_model.onnx"}
        if has("decoder_with_past_model.onnx"):
            graphs["decoder_with_past"] = "decoder_with_past_model.onnx"
        return Layout("optimum decoder, two graphs" if len(graphs) == 2 else "optimum decoder", graphs)
    for name in ("model.onnx", "decoder.onnx"):
        if has(name):
            return Layout("single graph", {"model": name})
    onnx_files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.onnx"))
    if len(onnx_files) == 1:
        return Layout("single graph", {"model": onnx_files[0]})
    if not onnx_files:
        raise BundleError("no .onnx graph in the upload")
    raise BundleError(
        f"cannot tell which .onnx file is the model among {', '.join(onnx_files[:6])}: name it model.onnx"
    )


def detect_task(root: Path, layout: Layout, config: ModelConfig) -> tuple[Task, str] | None:
    """(task, why) from what the files say, or None when they do not say."""
    if layout.kind == "onnxruntime-genai":
        return Task.TEXT_GENERATION, "genai_config.json (an onnxruntime-genai model folder)"
    if layout.kind == "sentence-transformers":
        return Task.EMBEDDINGS, "modules.json (a sentence-transformers folder)"
    if "encoder" in layout.graphs:
        return Task.TEXT2TEXT, f"an encoder and a decoder graph ({layout.describe()})"
    if "decoder" in layout.graphs:
        return Task.TEXT_GENERATION, f"decoder graphs ({layout.describe()})"
    found = task_from_architectures(config)
    if found is not None:
        return Task(found[0]), found[1]
    graph = root / layout.graphs["model"]
    io = load_io(graph)
    names = {t.name: t for t in io.inputs}
    outputs = {t.name: t for t in io.outputs}
    if "input_ids" in names:
        if any(n.startswith("past_key_values") for n in names) or len(outputs.get("logits", _NO).shape) == 3:
            return Task.TEXT_GENERATION, f"{graph.name} returns logits per position"
        if len(outputs.get("logits", _NO).shape) == 2:
            return Task.TEXT_CLASSIFICATION, f"{graph.name} returns logits per text"
        if {"last_hidden_state", "sentence_embedding", "token_embeddings"} & set(outputs):
            return Task.EMBEDDINGS, f"{graph.name} returns hidden states"
        return None
    floats = [t for t in io.inputs if t.dtype in ("float", "double")]
    if len(io.inputs) == 1 and floats and len(floats[0].shape) == 2:
        return Task.ANOMALY, f"{graph.name} takes one float window [batch, features] and no text"
    return None


_NO = TensorInfo(name="-", dtype="-", shape=[])


# ------------------------------------------------------------------------------------------ the files --


def external_data(root: Path, graph: str) -> list[str]:
    """The external-data files ``graph`` refers to (paths relative to ``root``)."""
    path = root / graph
    try:
        import onnx
    except ModuleNotFoundError:  # without onnx: the names exporters give them
        candidates = [path.name + ".data", path.name + "_data", path.stem + ".onnx.data"]
        return sorted(
            {(path.parent / c).relative_to(root).as_posix() for c in candidates if (path.parent / c).is_file()}
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # load_io reports a graph onnxruntime cannot load
        return []
    found: set[str] = set()
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for tensor in g.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                found |= {e.value for e in tensor.external_data if e.key == "location"}
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return sorted((path.parent / loc).relative_to(root).as_posix() for loc in found if (path.parent / loc).is_file())


def needed_files(root: Path, graphs: list[str], extra: list[str]) -> list[str]:
    """The graphs, their external data and ``extra`` files that exist: what the device gets."""
    keep = set(graphs) | {e for e in extra if (root / e).is_file()}
    for graph in graphs:
        keep |= set(external_data(root, graph))
    return sorted(keep)


# ------------------------------------------------------------------------------------------- inspect --


@dataclass
class Inspection:
    """The bundle to register and what the import read from the files (reported to the operator)."""

    bundle: ExportedBundle
    layout: Layout
    notes: list[str]


def inspect_bundle(root: Path, options: ImportOptions) -> Inspection:
    """Recognise the layout in ``root``, settle the task and describe how to run it."""
    layout = find_layout(root)
    try:
        config = read_model_config(root)
    except ConfigError as exc:
        raise BundleError(str(exc)) from None
    notes = [f"layout: {layout.describe()}"]
    task = options.task
    if task is None:
        detected = detect_task(root, layout, config)
        if detected is None:
            raise BundleError(
                "the files do not say which task the model performs: give options.task (text-classification,"
                " embeddings, text-generation, text2text or anomaly)"
            )
        task, why = detected
        notes.append(f"task {task.value} from {why}")
    if layout.kind == "onnxruntime-genai":
        bundle = inspect_genai(root, options, config, notes)
    elif task == Task.ANOMALY:
        bundle = _inspect_anomaly(root, layout, options, notes)
    elif task == Task.TEXT2TEXT:
        bundle = _inspect_text2text(root, layout, options, config, notes)
    elif task == Task.TEXT_GENERATION:
        bundle = _inspect_generation(root, layout, options, config, notes)
    else:
        bundle = _inspect_encoder(root, layout, task, options, config, notes)
    notes += config.describe()
    return Inspection(bundle, layout, notes)


def _tokenizer(root: Path, task: Task) -> str:
    if not (root / "tokenizer.json").is_file():
        raise BundleError(
            f"a {task.value} model needs its tokenizer: add tokenizer.json to the bundle (Hugging Face's"
            " tokenizer.save_pretrained writes it)"
        )
    return "tokenizer.json"


def _limit(options: ImportOptions, config: ModelConfig, default: int, notes: list[str]) -> int:
    """The sequence limit: the operator's, within what the model's files allow; else the files'."""
    known = int(config.context.value) if config.context is not None else None
    if options.max_length is not None:
        if known is not None and options.max_length > known:
            assert config.context is not None
            raise BundleError(
                f"max_length {options.max_length} is over the model's limit of {known} tokens"
                f" ({config.context.source}): give at most {known}, or leave it out"
            )
        return options.max_length
    if known is not None:
        return known
    notes.append(f"max_length {default} (the files name no limit; set options.max_length)")
    return default


def _check_text_inputs(io: IO, task: Task, entry: str) -> None:
    names = {t.name: t for t in io.inputs}
    if "input_ids" not in names:
        given = ", ".join(f"{t.name} ({t.dtype})" for t in io.inputs)
        raise BundleError(
            f"{entry} does not take token ids, so it cannot be a {task.value} model: its inputs are {given};"
            " a text model takes input_ids and attention_mask"
        )
    if names["input_ids"].dtype not in ("int64", "int32"):
        raise BundleError(f"{entry}: input_ids must be int64 or int32, it is {names['input_ids'].dtype}")
    allowed = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "use_cache_branch"}
    extra = [n for n in names if n not in allowed and not n.startswith("past_key_values")]
    if extra:
        raise BundleError(f"{entry}: unexpected inputs for a {task.value} model: {', '.join(extra)}")


def _single_graph(layout: Layout, task: Task) -> str:
    graph = layout.graphs.get("model") or layout.graphs.get("decoder")
    if graph is None:
        raise BundleError(f"a {task.value} model is one graph; this upload is a {layout.describe()}")
    return graph


def _inspect_encoder(
    root: Path, layout: Layout, task: Task, options: ImportOptions, config: ModelConfig, notes: list[str]
) -> ExportedBundle:
    entry = _single_graph(layout, task)
    io = load_io(root / entry)
    _check_text_inputs(io, task, entry)
    tokenizer = _tokenizer(root, task)
    preprocess = Preprocess(tokenizer=tokenizer, max_length=_limit(options, config, 256, notes))
    keep = needed_files(root, [entry], [tokenizer])
    if task == Task.TEXT_CLASSIFICATION:
        outputs = {o.name: o for o in io.outputs}
        out = outputs.get("logits") or io.outputs[0]
        if len(out.shape) != 2:
            raise BundleError(
                f"a classifier returns [batch, classes] logits; {entry}'s output {out.name} is {out.shape}"
            )
        labels = options.labels or config.labels
        n = out.shape[1]
        if labels and isinstance(n, int) and len(labels) != n:
            raise BundleError(f"{len(labels)} labels given for a model with {n} classes")
        if labels and not options.labels:
            notes.append(f"labels {labels} (config.json id2label)")
        spec = RunSpec(
            task=task, io=io, entrypoint=entry, preprocess=preprocess, postprocess=Postprocess(labels=labels)
        )
        return ExportedBundle(root, spec, keep=keep)
    if task != Task.EMBEDDINGS:
        raise BundleError(f"{entry} is an encoder; a {task.value} model cannot be served from it")
    outputs = {o.name: o for o in io.outputs}
    pooling: str | None = options.pooling
    normalize = options.normalize
    if layout.kind == "sentence-transformers":
        st_pooling, st_normalize = _sentence_transformers_modules(root, "sentence_embedding" in outputs)
        pooling = pooling or st_pooling
        normalize = st_normalize if normalize is None else normalize
        notes.append(f"pooling {pooling}, normalize {normalize} (sentence-transformers modules.json)")
    # The pooled output when the graph has one (optimum's sentence-transformers export), else the hidden states
    for name in ("sentence_embedding", "last_hidden_state", "token_embeddings"):
        if name in outputs:
            chosen = outputs[name]
            break
    else:
        chosen = io.outputs[0]
    if len(chosen.shape) == 2:
        pooling = "none"
    elif pooling in (None, "none"):
        pooling = "mean"
        notes.append("mean pooling (a bare encoder's usual choice; set options.pooling to change it)")
    if pooling == "none" and len(chosen.shape) != 2:
        raise BundleError(f"{entry}'s output {chosen.name} is {chosen.shape}: pooled embeddings are [batch, dim]")
    # the device pipeline reads the first listed output
    io = IO(inputs=io.inputs, outputs=[chosen] + [o for o in io.outputs if o.name != chosen.name])
    post = Postprocess(
        normalize=True if normalize is None else normalize, zero_shot_labels=options.zero_shot_labels or {}
    )
    spec = RunSpec(
        task=task,
        io=io,
        entrypoint=entry,
        preprocess=preprocess.model_copy(update={"pooling": pooling}),
        postprocess=post,
    )
    return ExportedBundle(root, spec, keep=keep)


def _sentence_transformers_modules(root: Path, graph_pools: bool) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers folder's modules.json and module configs."""
    try:
        modules = json.loads((root / "modules.json").read_text())
        kinds = [(str(m.get("type", "")), str(m.get("path", ""))) for m in modules]
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise BundleError(f"modules.json is not a sentence-transformers module list: {exc}") from None
    pooling = "mean"
    normalize = False
    for kind, path in kinds:
        name = kind.rsplit(".", 1)[-1]
        if name == "Pooling":
            try:
                cfg = read_json(root / path, "config.json")
            except ConfigError as exc:
                raise BundleError(f"{path}/config.json: {exc}") from None
            mode = cfg.get("pooling_mode")
            modes = (
                [mode] if isinstance(mode, str) else [k for k, v in cfg.items() if k in _POOLING_MODES and v is True]
            )
            runnable = [_POOLING_MODES[m] for m in modes if m in _POOLING_MODES]
            if len(modes) != 1 or not runnable:
                raise BundleError(
                    f"{path}/config.json asks for pooling {modes or cfg}: the device pools with one of mean, cls,"
                    " max or lasttoken; export with optimum-cli --library sentence_transformers to pool in the graph"
                )
            pooling = runnable[0]
        elif name == "Normalize":
            normalize = True
        elif name not in ("Transformer",) and not graph_pools:
            raise BundleError(
                f"the sentence-transformers folder has a {name} module ({path or kind}) that its ONNX graph does"
                " not contain: export with optimum-cli export onnx --library sentence_transformers, whose"
                " sentence_embedding output includes every module"
            )
    return pooling, normalize


def _generation(options: ImportOptions, config: ModelConfig, notes: list[str], **fields: Any) -> Generation:
    """Generation settings: the files' special ids, then what the operator passed."""
    read: dict[str, Any] = {}
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id"):
        found = getattr(config, name)
        if found is not None:
            read[name] = found.value
    if config.max_new_tokens is not None:
        read["max_new_tokens"] = config.max_new_tokens.value
    given = options.generation.model_dump(exclude_unset=True) if options.generation else {}
    try:
        return Generation(**{**read, **fields, **given})
    except ValueError as exc:
        raise BundleError(f"generation settings: {exc}") from None


def _inspect_generation(
    root: Path, layout: Layout, options: ImportOptions, config: ModelConfig, notes: list[str]
) -> ExportedBundle:
    decoder = layout.graphs.get("decoder") or layout.graphs.get("model")
    assert decoder is not None
    with_past = layout.graphs.get("decoder_with_past")
    io = load_io(root / decoder)
    _check_text_inputs(io, Task.TEXT_GENERATION, decoder)
    if with_past is not None:
        _check_text_inputs(load_io(root / with_past), Task.TEXT_GENERATION, with_past)
    if "logits" not in {o.name for o in io.outputs}:
        raise BundleError(f"{decoder} returns no logits: it is not a language-model head")
    tokenizer = _tokenizer(root, Task.TEXT_GENERATION)
    gen = _generation(options, config, notes, decoder=decoder, decoder_with_past=with_past)
    if not gen.eos_token_id:
        raise BundleError(
            "the model's files name no end-of-sequence token (generation_config.json or config.json"
            ' eos_token_id): give options {"generation": {"eos_token_id": ID}}'
        )
    if not any(t.name.startswith("past_key_values") for t in io.inputs) and with_past is None:
        notes.append(f"{decoder} has no KV cache: every step re-runs the whole text (export with past to avoid it)")
    preprocess = Preprocess(
        tokenizer=tokenizer, max_length=_limit(options, config, _SECONDS_FLOOR_DEFAULT_CONTEXT, notes)
    )
    spec = RunSpec(task=Task.TEXT_GENERATION, io=io, entrypoint=decoder, preprocess=preprocess, generation=gen)
    graphs = [decoder] + ([with_past] if with_past else [])
    return ExportedBundle(root, spec, keep=needed_files(root, graphs, [tokenizer]))


def _inspect_text2text(
    root: Path, layout: Layout, options: ImportOptions, config: ModelConfig, notes: list[str]
) -> ExportedBundle:
    encoder = layout.graphs.get("encoder")
    decoder = layout.graphs.get("decoder")
    if encoder is None or decoder is None:
        raise BundleError(
            "a text2text bundle needs an encoder and a decoder graph: optimum's encoder_model.onnx and"
            " decoder_model.onnx (or decoder_model_merged.onnx), or encoder.onnx and decoder.onnx"
        )
    with_past = layout.graphs.get("decoder_with_past")
    io = load_io(root / encoder)
    load_io(root / decoder)
    if with_past:
        load_io(root / with_past)
    _check_text_inputs(io, Task.TEXT2TEXT, encoder)
    tokenizer = _tokenizer(root, Task.TEXT2TEXT)
    gen = _generation(options, config, notes, encoder=encoder, decoder=decoder, decoder_with_past=with_past)
    if gen.decoder_start_token_id is None:
        raise BundleError(
            "the model's files name no decoder start token (config.json or generation_config.json"
            ' decoder_start_token_id): give options {"generation": {"decoder_start_token_id": ID}}'
        )
    if not gen.eos_token_id:
        raise BundleError(
            "the model's files name no end-of-sequence token (generation_config.json or config.json"
            ' eos_token_id): give options {"generation": {"eos_token_id": ID}}'
        )
    spec = RunSpec(
        task=Task.TEXT2TEXT,
        io=io,
        entrypoint=encoder,
        generation=gen,
        preprocess=Preprocess(tokenizer=tokenizer, max_length=_limit(options, config, 512, notes)),
    )
    graphs = [encoder, decoder] + ([with_past] if with_past else [])
    return ExportedBundle(root, spec, keep=needed_files(root, graphs, [tokenizer]))


def inspect_genai(root: Path, options: ImportOptions, config: ModelConfig, notes: list[str]) -> ExportedBundle:
    """An onnxruntime-genai model folder (genai_config.json, model, tokenizer)."""
    try:
        genai = json.loads((root / "genai_config.json").read_text())
        model_cfg = genai["model"]
        decoder = model_cfg["decoder"]
        filename = decoder["filename"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"genai_config.json is not an onnxruntime-genai model configuration: {exc}") from None
    if not (root / filename).is_file():
        raise BundleError(f"genai_config.json names {filename}, which is not in the bundle")
    tokenizer = _tokenizer(root, Task.TEXT_GENERATION)
    io = load_io(root / filename)
    from controller.registry.hfconfig import Found, id_list, one_id

    context = model_cfg.get("context_length")
    if isinstance(context, int) and context > 0:
        config.context = Found(context, "genai_config.json context_length")
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if model_cfg.get(name) is not None and id_list(model_cfg.get(name)):
            value = id_list(model_cfg[name]) if name == "eos_token_id" else one_id(model_cfg[name])
            setattr(config, name, Found(value, f"genai_config.json {name}"))
    gen = _generation(
        options,
        config,
        notes,
        num_layers=decoder.get("num_hidden_layers", 0),
        num_kv_heads=decoder.get("num_key_value_heads", 0),
        head_dim=decoder.get("head_size", 0),
        decoder=filename,
    )
    spec = RunSpec(
        task=Task.TEXT_GENERATION,
        runtime=Runtime.ONNXRUNTIME_GENAI,
        io=io,
        entrypoint=filename,
        preprocess=Preprocess(tokenizer=tokenizer, max_length=_limit(options, config, 2048, notes)),
        generation=gen,
    )
    keep = needed_files(root, [filename], [tokenizer, "genai_config.json"])
    return ExportedBundle(root, spec, keep=keep)


# --------------------------------------------------------------------------------------------- anomaly --


def graph_classes(path: Path) -> list[int | str]:
    """The class labels an ONNX-ML classifier graph names (ZipMap, TreeEnsembleClassifier, ...), if any."""
    try:
        import onnx
    except ModuleNotFoundError:
        return []
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "classlabels_strings" and attr.strings:
                return [s.decode() for s in attr.strings]
            if attr.name in ("classlabels_int64s", "classlabels_ints") and attr.ints:
                return [int(i) for i in attr.ints]
    return []


def _inspect_anomaly(root: Path, layout: Layout, options: ImportOptions, notes: list[str]) -> ExportedBundle:
    entry = _single_graph(layout, Task.ANOMALY)
    io = load_io(root / entry)
    floats = [t for t in io.inputs if t.dtype in ("float", "double")]
    if len(io.inputs) != 1 or not floats or len(floats[0].shape) != 2:
        given = ", ".join(f"{t.name} {t.dtype}{t.shape}" for t in io.inputs)
        raise BundleError(f"an anomaly model takes one float window [batch, features]; {entry} takes {given}")
    opts = options.anomaly
    n_features = (opts.n_features if opts else None) or floats[0].shape[1]
    if not isinstance(n_features, int):
        raise BundleError('the window length is not fixed in the graph: give options {"anomaly": {"n_features": N}}')
    outputs = {o.name: o for o in io.outputs}
    label_output = next(
        (n for n in ("label", "output_label") if n in outputs and outputs[n].dtype in ("int64", "int32", "string")),
        None,
    )
    classes = graph_classes(root / entry) if label_output else []
    settings: dict[str, Any] = {"input": floats[0].name, "n_features": n_features}
    if label_output and classes:
        settings |= _classifier_settings(root / entry, io, label_output, classes, options, notes)
    elif label_output:
        settings |= _outlier_settings(root / entry, io, label_output, floats[0], n_features, options, notes)
    else:
        settings |= _score_settings(io, options)
    if opts is not None and opts.output is not None:
        if opts.output not in outputs:
            raise BundleError(f"anomaly.output {opts.output!r} is not an output of {entry} ({', '.join(outputs)})")
        settings["output"] = opts.output
    spec = RunSpec(task=Task.ANOMALY, io=io, entrypoint=entry, anomaly=Anomaly(**settings))
    return ExportedBundle(root, spec, keep=needed_files(root, [entry], []))


def _classifier_settings(
    path: Path, io: IO, label_output: str, classes: list[int | str], options: ImportOptions, notes: list[str]
) -> dict[str, Any]:
    """A classifier (skl2onnx): its label decides; a window is anomalous when it is not the normal class."""
    opts = options.anomaly
    normal: int | str | None = opts.normal_label if opts else None
    if normal is None:
        named = [c for c in classes if str(c).lower() in ("normal", "ok", "inlier", "good")]
        if len(named) == 1:
            normal = named[0]
        elif sorted(str(c) for c in classes) == ["0", "1"]:
            normal = classes[[str(c) for c in classes].index("0")]
        else:
            raise BundleError(
                f"the classifier's classes are {classes}: say which one is normal (every other class is an"
                ' anomaly) with options {"anomaly": {"normal_label": ...}}'
            )
        notes.append(f"normal class {normal!r} (of {classes}); anomalous: every other class")
    if str(normal) not in {str(c) for c in classes}:
        raise BundleError(f"anomaly.normal_label {normal!r} is not one of the classifier's classes {classes}")
    probability = next((o.name for o in io.outputs if o.name != label_output), label_output)
    return {
        "output": probability,
        "label_output": label_output,
        "normal_label": normal,
        "classes": classes,
        # the score is 1 - P(normal); the label decides, the threshold only places the score's midpoint
        "threshold": opts.threshold if opts and opts.threshold is not None else 0.5,
        "higher_is_anomalous": True,
    }


def _outlier_settings(
    path: Path, io: IO, label_output: str, window: TensorInfo, n_features: int, options: ImportOptions, notes: list[str]
) -> dict[str, Any]:
    """An outlier detector (skl2onnx's IsolationForest, OneClassSVM, LocalOutlierFactor, EllipticEnvelope):
    scikit-learn's convention is label -1 for an outlier and 1 for an inlier, with a score (its
    decision_function) below 0 for outliers. The convention is checked on the graph itself."""
    import numpy as np
    import onnxruntime as ort

    scores = [o for o in io.outputs if o.name != label_output and o.dtype in ("float", "double")]
    if not scores:
        raise BundleError(f"{path.name} has a label output but no float score output")
    score = scores[0].name
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    probe = np.concatenate([rng.normal(0.0, s, (64, n_features)) for s in (0.01, 0.3, 1.0, 3.0, 30.0)])
    dtype = np.float64 if window.dtype == "double" else np.float32
    labels, values = session.run([label_output, score], {window.name: probe.astype(dtype)})
    labels = np.asarray(labels).reshape(-1)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    opts = options.anomaly
    seen = sorted({int(v) for v in labels})
    if set(seen) <= {-1, 1} and bool(np.all((labels == -1) == (values < 0))):
        notes.append(
            f"outlier detector: label -1 is an outlier (checked on {len(labels)} windows: score {score} < 0"
            " exactly where the label is -1, so lower scores are more anomalous)"
        )
        return {
            "output": score,
            "label_output": label_output,
            "normal_label": 1 if not (opts and opts.normal_label is not None) else opts.normal_label,
            "threshold": 0.0 if not (opts and opts.threshold is not None) else opts.threshold,
            "higher_is_anomalous": False
            if not (opts and opts.higher_is_anomalous is not None)
            else opts.higher_is_anomalous,
        }
    if opts is None or opts.normal_label is None:
        raise BundleError(
            f"{path.name}'s label output {label_output} gives {seen} but does not follow scikit-learn's outlier"
            ' convention (-1 outlier, 1 inlier, score < 0 for outliers): give options {"anomaly": {"normal_label":'
            ' ..., "higher_is_anomalous": ..., "threshold": ...}}'
        )
    return {
        "output": score,
        "label_output": label_output,
        "normal_label": opts.normal_label,
        "threshold": opts.threshold if opts.threshold is not None else 0.0,
        "higher_is_anomalous": True if opts.higher_is_anomalous is None else opts.higher_is_anomalous,
    }


def _score_settings(io: IO, options: ImportOptions) -> dict[str, Any]:
    """A graph that only scores: the operator must say where the line is and on which side anomalies are."""
    opts = options.anomaly
    if opts is None or opts.threshold is None or opts.higher_is_anomalous is None:
        raise BundleError(
            "this anomaly model returns a score but no label, so the import cannot tell which scores are"
            ' anomalous: give options {"anomaly": {"threshold": T, "higher_is_anomalous": true|false}}'
            " (true: a score above T is an anomaly, as for reconstruction errors; false: below T, as for"
            " scikit-learn's decision_function)"
        )
    return {
        "output": _pick_score_output(io),
        "threshold": opts.threshold,
        "higher_is_anomalous": opts.higher_is_anomalous,
    }


def _pick_score_output(io: IO) -> str:
    for preferred in ("scores", "score", "anomaly_score", "variable"):
        for o in io.outputs:
            if o.name == preferred:
                return o.name
    floats = [o for o in io.outputs if o.dtype in ("float", "double")]
    if not floats:
        raise BundleError("the anomaly model has no float output to use as a score; name it in anomaly.output")
    return floats[-1].name

"""The operator's reference check: inputs with the outputs their own framework gave, run through the device
pipeline of each variant.

fp32 must match every value within the tolerance (``|got - expected| <= t + t * |expected|``), or the import
fails with the first case that did not: a model whose fp32 does not reproduce its framework was imported
wrong (wrong pooling, tokenizer, label order, score direction), and deploying it would only spread that.
Quantized variants cannot match float values to 1e-4; for them only the decisions are compared (label,
anomaly, token ids, text; the class the expected logits pick; an embedding within the cosine floor of the
expected one), and the result is recorded, not enforced (their floors do that).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from controller.registry.bundles import BundleError, ImportOptions, ReferenceCase
from controller.registry.convert import ExportedBundle
from wire.manifest import Task

#: the most cases one import checks (each runs through every variant's pipeline)
MAX_CASES = 1000
#: a reference file's largest size (1,000 cases of 1,024-value embeddings take ~20 MB)
MAX_FILE_BYTES = 64 * 1024 * 1024

#: expected keys compared within the tolerance, and those compared exactly, by task
_FLOAT_KEYS = {"logits", "embedding", "score", "scores"}
_EXACT_KEYS = {"label", "anomaly", "token_ids", "text"}
_KEYS = {
    Task.TEXT_CLASSIFICATION: {"logits", "label", "score", "scores"},
    Task.EMBEDDINGS: {"embedding", "label", "score"},
    Task.TEXT_GENERATION: {"token_ids", "text"},
    Task.TEXT2TEXT: {"token_ids", "text"},
    Task.ANOMALY: {"label", "anomaly", "score", "scores"},
}


@dataclass(frozen=True)
class ReferenceResult:
    passed: bool
    #: the cases compared (a case that expects only scores gives a quantized variant nothing to compare)
    cases: int
    detail: str

    @property
    def status(self) -> str | None:
        if not self.cases:
            return None
        return "pass" if self.passed else "fail"


def parse_reference(text: str) -> list[ReferenceCase]:
    """Reference cases from a file as ``--reference`` takes it: JSON lines of ``{"input": ..., "expected":
    ...}`` (blank lines skipped), or one JSON array of such objects. BundleError names the line at fault."""
    stripped = text.strip()
    if not stripped:
        raise BundleError('the reference file is empty: give one {"input": ..., "expected": ...} object a line')
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except ValueError as exc:
            raise BundleError(f"the reference file is not valid JSON: {exc}") from None
        numbered = [(f"item {i}", item) for i, item in enumerate(items, 1)]
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"line {number}", json.loads(line)))
            except ValueError as exc:
                raise BundleError(f"reference line {number} is not JSON ({exc}): give one object a line") from None
    if len(numbered) > MAX_CASES:
        raise BundleError(f"the reference file has {len(numbered)} cases; at most {MAX_CASES} are checked")
    cases = []
    for where, item in numbered:
        try:
            cases.append(ReferenceCase.model_validate(item))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in first["loc"]) or "the case"
            raise BundleError(
                f'reference {where}: {field}: {first["msg"]} (each case is {{"input": {{...}}, "expected": {{...}}}})'
            ) from None
    return cases


def read_reference_file(path: Path) -> str:
    """The text of an uploaded reference file (BundleError when it is too large or not UTF-8)."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise BundleError(f"the reference file has {size} bytes; at most {MAX_FILE_BYTES} are read")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BundleError("the reference file is not UTF-8 text: give JSON lines") from None


def with_reference(options: ImportOptions, text: str) -> ImportOptions:
    """``options`` with the cases of a reference file (the upload's ``reference`` part)."""
    if options.reference:
        raise BundleError("the reference is given twice (options.reference and a reference file): give one of them")
    return options.model_copy(update={"reference": parse_reference(text)})


def check_keys(task: Task, cases: list[ReferenceCase]) -> None:
    """BundleError for an expected output the task's results do not have (before anything is built)."""
    allowed = _KEYS[task]
    for i, case in enumerate(cases, 1):
        unknown = sorted(set(case.expected) - allowed)
        if unknown:
            raise BundleError(
                f"reference case {i} expects {unknown[0]!r}, which the results of a {task.value} model do not have"
                f" (compare one of: {', '.join(sorted(allowed))})"
            )
        if not case.expected:
            raise BundleError(f"reference case {i} expects nothing: give at least one output to compare")


def run_reference(
    bundle: ExportedBundle,
    cases: list[ReferenceCase],
    tolerance: float,
    *,
    decisions_only: bool = False,
    cosine: float = 0.9,
) -> ReferenceResult:
    """Run every case through ``bundle``'s device pipeline and compare (see the module docstring); with
    ``decisions_only`` an embedding matches when its cosine to the expected one is at least ``cosine``."""
    from agent.inference.pipelines import load_pipeline
    from agent.inference.session import InputError

    pipeline = load_pipeline(bundle.spec, bundle.root)
    worst = 0.0
    matched = compared = 0
    first_miss = ""
    try:
        for i, case in enumerate(cases, 1):
            expected = _decisions(case.expected, cosine) if decisions_only else case.expected
            if not expected:
                continue
            compared += 1
            try:
                got = pipeline.run([dict(case.input)])[0]
            except InputError as exc:
                got = {"error": str(exc)}
            miss, error = _compare(expected, got, tolerance)
            worst = max(worst, error)
            if miss:
                first_miss = first_miss or f"case {i}: {miss}"
            else:
                matched += 1
    finally:
        pipeline.close()
    if not compared:
        return ReferenceResult(False, 0, "the cases expect only scores, which a quantized variant cannot match")
    what = "decisions" if decisions_only else "outputs"
    detail = f"{matched}/{compared} cases matched ({what})"
    if not decisions_only:
        detail += f", largest difference {worst:.3g}"
    if first_miss:
        detail += f"; first difference: {first_miss}"
    return ReferenceResult(matched == compared, compared, detail[:1024])


def _decisions(expected: dict[str, Any], cosine: float) -> dict[str, Any]:
    """What of ``expected`` a quantized variant must still match: the exact keys, the class its logits pick,
    its embedding's direction."""
    out = {k: v for k, v in expected.items() if k in _EXACT_KEYS}
    logits = expected.get("logits")
    if isinstance(logits, list) and logits and all(isinstance(x, int | float) for x in logits):
        out["_class"] = max(range(len(logits)), key=lambda i: logits[i])
    if isinstance(expected.get("embedding"), list):
        out["_direction"] = (expected["embedding"], cosine)
    return out


def _compare(expected: dict[str, Any], got: dict[str, Any], tolerance: float) -> tuple[str, float]:
    """(what differs or "", the largest float difference seen)."""
    if "error" in got:
        return f"the model refused the input: {got['error']}", math.inf
    worst = 0.0
    for key, want in expected.items():
        if key == "_class":
            have_logits = got.get("logits") or []
            picked = max(range(len(have_logits)), key=lambda i: have_logits[i]) if have_logits else None
            if picked != want:
                return f"its logits pick class {picked}, the expected logits class {want}", worst
            continue
        if key == "_direction":
            vector, floor = want
            similarity = _cosine(vector, got.get("embedding"))
            if similarity is None or similarity < floor:
                return f"embedding at cosine {similarity} to the expected one, under {floor:g}", worst
            continue
        have = got.get(key)
        if key in _EXACT_KEYS:
            if key == "label" and str(have) != str(want) or key != "label" and have != want:
                return f"{key} is {_short(have)}, expected {_short(want)}", worst
            continue
        pairs = _float_pairs(want, have)
        if pairs is None:
            return f"{key} is {_short(have)}, expected {_short(want)} (not comparable)", worst
        for a, b in pairs:
            diff = abs(a - b)
            worst = max(worst, diff)
            if not diff <= tolerance + tolerance * abs(a):
                return f"{key} differs by {diff:.3g} (expected {a:.6g}, got {b:.6g}; tolerance {tolerance:g})", worst
    return "", worst


def _cosine(a: Any, b: Any) -> float | None:
    pairs = _float_pairs(a, b)
    if not pairs:
        return None
    dot = sum(x * y for x, y in pairs)
    norms = math.sqrt(sum(x * x for x, _ in pairs) * sum(y * y for _, y in pairs))
    return round(dot / norms, 6) if norms else None


def _float_pairs(want: Any, have: Any) -> list[tuple[float, float]] | None:
    if isinstance(want, bool) or isinstance(have, bool):
        return None
    if isinstance(want, int | float) and isinstance(have, int | float):
        return [(float(want), float(have))]
    if isinstance(want, list) and isinstance(have, list) and len(want) == len(have):
        pairs: list[tuple[float, float]] = []
        for a, b in zip(want, have, strict=True):
            sub = _float_pairs(a, b)
            if sub is None:
                return None
            pairs += sub
        return pairs
    if isinstance(want, dict) and isinstance(have, dict) and set(map(str, want)) == set(map(str, have)):
        have_str = {str(k): v for k, v in have.items()}
        pairs = []
        for k, a in want.items():
            sub = _float_pairs(a, have_str[str(k)])
            if sub is None:
                return None
            pairs += sub
        return pairs
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

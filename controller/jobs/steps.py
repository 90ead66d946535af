"""The steps a derive job chains, and what each takes: checked when a job is submitted, again in the worker."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["STEP_KINDS", "StepSpec", "StepsError", "check_steps", "needs_data", "parse_step_arg"]

STEP_KINDS = ("distill", "prune", "finetune", "quantize")


class StepsError(ValueError):
    """A step list the jobs cannot run; the message says which step and why."""


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DistillParams(_Params):
    student: str = Field(min_length=1, max_length=200, description="bert-tiny | bert-mini | bert-small | layers=3,...")
    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=1024)
    lr: float = Field(1e-4, gt=0, le=1)
    max_length: int = Field(128, ge=8, le=4096)
    held_out: float = Field(0.1, ge=0, lt=1)


class PruneParams(_Params):
    heads: float = Field(ge=0, lt=1, description="fraction of attention heads removed")
    ffn: float = Field(ge=0, lt=1, description="fraction of feed-forward neurons removed")
    recover: bool = Field(True, description="a short recovery distillation from the unpruned model (needs data)")
    recover_epochs: int = Field(1, ge=1, le=100)
    max_length: int = Field(128, ge=8, le=4096)
    held_out: float = Field(0.1, ge=0, lt=1)


class FinetuneParams(_Params):
    lora_rank: int | None = Field(None, ge=1, le=256)
    epochs: int = Field(3, ge=1, le=1000)
    lr: float = Field(5e-5, gt=0, le=1)
    max_length: int = Field(128, ge=8, le=4096)
    held_out: float = Field(0.2, gt=0, lt=1)


class QuantizeParams(_Params):
    variants: list[Literal["int8", "int4"]] = Field(
        default_factory=lambda: ["int8"],  # type: ignore[arg-type]
        min_length=1,
        description="the importer's variants (fp32 is always kept)",
    )


PARAMS: dict[str, type[_Params]] = {
    "distill": DistillParams,
    "prune": PruneParams,
    "finetune": FinetuneParams,
    "quantize": QuantizeParams,
}


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["distill", "prune", "finetune", "quantize"]
    params: dict[str, Any] = Field(default_factory=dict)


def check_steps(steps: list[StepSpec], has_data: bool) -> list[dict[str, Any]]:
    """The steps with their parameters filled in with the defaults; StepsError naming the first bad one."""
    if not steps:
        raise StepsError("a derive job needs at least one step")
    if len(steps) > 10:
        raise StepsError("a derive job takes at most 10 steps")
    out: list[dict[str, Any]] = []
    for i, step in enumerate(steps, 1):
        try:
            params = PARAMS[step.kind].model_validate(step.params)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())
            raise StepsError(f"step {i} ({step.kind}): {problems}") from None
        if step.kind in ("distill", "finetune") and not has_data:
            what = "unlabeled texts" if step.kind == "distill" else "labeled examples"
            raise StepsError(f"step {i} ({step.kind}) needs a data file ({what}, JSON lines): give one")
        out.append({"kind": step.kind, "params": params.model_dump(mode="json")})
    return out


def needs_data(steps: list[dict[str, Any]]) -> bool:
    return any(s["kind"] in ("distill", "finetune") or (s["kind"] == "prune" and s["params"]["recover"]) for s in steps)


def _value(text: str) -> Any:
    """A CLI value: a number or a boolean when it reads as one, else the string; lists with '+' (int8+int4)."""
    if "+" in text:
        return [_value(t) for t in text.split("+")]
    if text.lower() in ("true", "false", "yes", "no"):
        return text.lower() in ("true", "yes")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_step_arg(text: str) -> StepSpec:
    """``distill:student=bert-mini,epochs=2`` / ``prune:heads=0.5,ffn=0.5`` / ``quantize:variants=int8+int4``."""
    kind, _, rest = text.partition(":")
    if kind not in STEP_KINDS:
        raise StepsError(f"{text!r}: the step kind must be one of {', '.join(STEP_KINDS)}")
    params: dict[str, Any] = {}
    # student specs contain commas themselves (layers=3,hidden=256): a piece without '=' belongs to the last key
    key = None
    for piece in filter(None, rest.split(",")):
        name, eq, value = piece.partition("=")
        if eq and name in PARAMS[kind].model_fields:
            key = name
            params[key] = _value(value)
        elif key is not None:
            params[key] = f"{params[key]},{piece}"
        else:
            raise StepsError(f"{text!r}: {piece!r} is not name=value for a {kind} step")
    if kind == "quantize" and isinstance(params.get("variants"), str):
        params["variants"] = [params["variants"]]
    return StepSpec(kind=kind, params=params)

"""What a rollout is: waves, gates, schedule; and which device goes in which wave."""

from __future__ import annotations

import hashlib
import math
import zoneinfo
from datetime import datetime
from functools import cache
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from controller.devices.selectors import SCHEMA_PATTERN as SELECTOR_PATTERN


def _amount_text(v: object) -> object:
    """A bare number (JSON ``1``, or ``1.0``: an integer to JSON Schema too) is a device count, like ``"1"``."""
    if isinstance(v, float) and v.is_integer() and v >= 0:
        return str(int(v))
    return str(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else v


_AMOUNT_PATTERN = r"^[0-9]+(\.[0-9]+)?%?$"
Amount = Annotated[
    str,
    BeforeValidator(_amount_text),
    Field(pattern=_AMOUNT_PATTERN),
    # the schema says what the validator takes: a JSON number is a count too
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": _AMOUNT_PATTERN}],
            "description": 'a device count (5 or "5") or a percentage ("10%")',
        }
    ),
]
#: a label selector; its grammar is in the schema, and ``selectors.parse`` names the term that breaks it
Selector = Annotated[str, Field(max_length=4096, json_schema_extra={"pattern": SELECTOR_PATTERN})]
#: the largest version number the database holds (PostgreSQL INTEGER)
MAX_VERSION = 2**31 - 1

# Crontab fields in the forms the schema describes (*, */step, n, n,m,...); the validator takes ranges and
# names too (1-5, mon-fri), but a range written backwards cannot be told apart by a regular expression.
_CRON_FIELDS = (
    ("[0-5]?[0-9]", "[1-9]|[1-5][0-9]"),  # minute
    ("[01]?[0-9]|2[0-3]", "[1-9]|1[0-9]|2[0-3]"),  # hour
    ("[1-9]|[12][0-9]|3[01]", "[1-9]|[12][0-9]|30"),  # day of month
    ("[1-9]|1[0-2]", "[1-9]|1[01]"),  # month
    ("[0-6]", "[1-6]"),  # day of week, 0 = Monday
)
CRON_PATTERN = "^" + " ".join(rf"(?:\*(?:/(?:{step}))?|(?:{n})(?:,(?:{n}))*)" for n, step in _CRON_FIELDS) + "$"


@cache
def _timezones() -> list[str]:
    return sorted(zoneinfo.available_timezones() | {"UTC"})


class WaveSpec(BaseModel):
    """One wave. ``until`` is cumulative: the share of the fleet covered once this wave is done."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(max_length=64)] | None = None
    until: Amount = "100%"
    selector: Selector | None = Field(
        None, description="pick this wave's devices by label (e.g. tier=canary) instead of by share"
    )
    max_concurrent: Annotated[int, Field(ge=1)] | None = None
    success_threshold: Annotated[float, Field(ge=0, le=100)] = Field(
        100.0, description="% of the wave's devices installed and healthy to move on (below: pause)"
    )
    failure_threshold: Amount = Field("10%", description="failed devices (count or %) that abort the rollout")
    bake_s: Annotated[float, Field(ge=0, le=30 * 86400)] = 60.0
    device_timeout_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 1800.0
    require_approval: bool = Field(False, description="wait for an operator's approval before the next wave")


def default_plan() -> list[WaveSpec]:
    """A canary of 1 device (or 1%), then 10%, 50%, 100%."""
    return [
        WaveSpec(name="canary", until="1%", bake_s=120),
        WaveSpec(name="10%", until="10%"),
        WaveSpec(name="50%", until="50%"),
        WaveSpec(name="100%", until="100%"),
    ]


class GateSpec(BaseModel):
    """Thresholds on how the new model behaves on a wave's devices after the bake time (None: gate off).

    The defaults come from ``python -m benchmarks gates`` (README, Gates): with them an identical model
    is aborted in well under 1% of rollouts and the regressions the benchmark plants are caught in the
    canary or the first wave.
    """

    model_config = ConfigDict(extra="forbid")

    error_rate_max: Annotated[float, Field(ge=0, le=1)] | None = Field(
        0.01, description="errors per inference on the new version, at most"
    )
    p95_latency_ratio_max: Annotated[float, Field(gt=0)] | None = Field(
        1.2, description="p95 latency (seconds per token for generation), new over previous, per device, at most"
    )
    rss_ratio_max: Annotated[float, Field(gt=0)] | None = Field(
        1.1, description="the model's own memory, new over previous, per device, at most"
    )
    shadow_agreement_min: Annotated[float, Field(ge=0, le=1)] | None = 0.95
    min_samples: Annotated[int, Field(ge=1)] = Field(
        100, description="inferences a device needs on each side (after its warm-up) before it is judged"
    )
    confidence: Annotated[float, Field(ge=0.5, lt=1)] = Field(
        0.95, description="one-sided confidence of each decision: pass, fail, or wait for more evidence"
    )
    warmup_s: Annotated[float, Field(ge=0, le=86400)] = Field(
        30.0, description="seconds after an activation or an agent restart that no gate reads"
    )
    deadline_s: Annotated[float, Field(gt=0)] = Field(
        600.0, description="a gate still without a decision this long after the bake fails the wave"
    )


class Window(BaseModel):
    """A maintenance window: starts at each ``cron`` fire time and lasts ``duration_s``."""

    model_config = ConfigDict(extra="forbid")

    cron: Annotated[
        str,
        Field(
            min_length=9,
            max_length=128,
            examples=["0 2 * * *"],
            json_schema_extra={"pattern": CRON_PATTERN},
            description="minute hour day month weekday (0 = Monday); ranges and names (1-5, mon-fri) work too",
        ),
    ]
    duration_s: Annotated[float, Field(gt=0, le=7 * 86400)]
    timezone: Annotated[str, Field(max_length=64, json_schema_extra={"enum": _timezones()})] = Field(
        "UTC", description="an IANA time zone, e.g. Europe/Berlin"
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(v)
        except ValueError as exc:
            raise ValueError(f"not a crontab expression ({exc}): use 'minute hour day month weekday'") from None
        return v

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, v: str) -> str:
        if v not in _timezones():
            raise ValueError(f"unknown time zone {v!r}: use an IANA name such as UTC or Europe/Berlin")
        return v


class RolloutShadow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.2
    min_samples: Annotated[int, Field(ge=1)] = 50
    max_duration_s: Annotated[float, Field(gt=0)] = 600.0
    against: Literal["active", "parent"] = Field(
        "active",
        description="what the candidate is compared with: always the model each device serves; 'parent' also "
        "requires the candidate to be a derived version and every targeted device to serve its lineage parent",
    )


class RolloutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    version: Annotated[int, Field(ge=1, le=MAX_VERSION)]
    variant: Annotated[str, Field(min_length=1, max_length=32)] = "auto"
    selector: Annotated[Selector, Field(min_length=1)]
    waves: Annotated[list[WaveSpec], Field(min_length=1, max_length=50)] | None = None
    gates: GateSpec = GateSpec()
    shadow: RolloutShadow | None = None
    start_at: datetime | None = None
    windows: Annotated[list[Window], Field(max_length=20)] = []
    late_devices: Literal["current", "next", "none"] = Field(
        "current", description="devices that appear or start matching later: join the current wave, the next, or none"
    )
    description: Annotated[str, Field(max_length=4096)] = ""


def amount(value: str, total: int) -> int:
    """A count ("5") or a percentage ("10%") of ``total`` as a number of devices (a percentage rounds up)."""
    if value.endswith("%"):
        return math.ceil(total * float(value[:-1]) / 100.0)
    return int(float(value))


def wave_sizes(waves: list[WaveSpec], total: int) -> list[int]:
    """How many devices each wave gets; every wave has at least one device while any are left."""
    sizes, covered = [], 0
    for i, wave in enumerate(waves):
        target = total if i == len(waves) - 1 else min(total, max(amount(wave.until, total), covered + 1))
        size = max(0, target - covered)
        sizes.append(size)
        covered += size
    return sizes


def assign(devices: dict[str, dict[str, str]], waves: list[WaveSpec], seed: str) -> dict[str, int]:
    """Wave index per device (``devices`` maps id to labels).

    A wave with its own selector takes the matching devices not yet placed; the others take their share
    in an order that is a stable hash of the rollout id, so canaries are spread over the fleet instead of
    always being the alphabetically first devices.
    """
    from controller.devices import selectors

    order = sorted(devices, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    out: dict[str, int] = {}
    total = len(order)
    covered = 0
    for index, wave in enumerate(waves):
        free = [d for d in order if d not in out]
        if wave.selector:
            chosen = [d for d in free if selectors.parse(wave.selector).matches(devices[d])]
        else:
            last = index == len(waves) - 1
            target = total if last else min(total, max(amount(wave.until, total), covered + 1))
            chosen = free[: max(0, target - covered)]
        for d in chosen:
            out[d] = index
        covered += len(chosen)
    return out

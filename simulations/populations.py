"""Real agents and virtual devices side by side, and the profile recorded from the real agents.

``populations`` splits a run's devices into ``real`` (agent processes) and ``virtual`` and gives, per
population and wave: how many devices, when they finished downloading, activated and reached a final
state (seconds after the wave's deployment appeared), the telemetry gates computed by the controller's own
code (``controller.rollouts.gates.telemetry_gates``) on that population's devices alone, and the final
states. ``measured_profile`` turns the real agents' telemetry into per-variant latency, memory and download
rate: the YAML ``slmfleet simulate --record-profile`` writes and ``calibration.profile`` replays.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from wire.histogram import quantile_from_buckets

#: states in which a device is past the download (the files are all there)
PAST_DOWNLOAD = ("verifying", "staged", "shadow", "activating", "active")
FINAL = ("active", "failed", "rolled_back", "cancelled")


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def wave_times(
    devices: Iterable[str],
    wave_targets: dict[int, list[dict[str, Any]]],
    first_seen: dict[tuple[str, str], dict[str, float]],
    wave_dep: dict[int, str],
    wave_starts: dict[int, float],
) -> list[dict[str, Any]]:
    """Per wave, for ``devices``: seconds from the wave's start (its ``deploying`` transition, the controller's
    clock) to each device's end of download, its activation and its first final state, as the runner first
    saw them (worker status every second, controller targets every half second: about 1 s resolution)."""
    mine = set(devices)
    out = []
    for wave in sorted(wave_targets):
        targets = [t for t in wave_targets[wave] if t["device_id"] in mine]
        dep = wave_dep.get(wave, "")
        start = wave_starts.get(wave)
        download, activation, done = [], [], []
        finals: Counter[str] = Counter()
        for t in targets:
            finals[t["state"]] += 1
            seen = first_seen.get((t["device_id"], dep), {})
            past = [v for s, v in seen.items() if s in PAST_DOWNLOAD]
            ended = [v for s, v in seen.items() if s in FINAL]
            if start is None:
                continue
            if past:
                download.append(max(0.0, min(past) - start))
            if "active" in seen:
                activation.append(max(0.0, seen["active"] - start))
            if ended:
                done.append(max(0.0, min(ended) - start))
        out.append(
            {
                "wave": wave + 1,
                "devices": len(targets),
                "download_s": _stats(download),
                "active_s": _stats(activation),
                "done_s": _stats(done),
                "duration_s": round(max(done), 2) if done else None,
                "final": dict(finals),
            }
        )
    return out


def wave_starts(rollout: dict[str, Any] | None) -> dict[int, float]:
    """Wave index -> when it started deploying (the rollout's transitions)."""
    starts: dict[int, float] = {}
    for t in (rollout or {}).get("transitions") or []:
        if t["to_state"] == "deploying":
            starts.setdefault(int(t["wave"]), _dt(t["at"]).timestamp())
    return starts


def wave_durations(rollout: dict[str, Any] | None) -> list[float | None]:
    """Seconds each wave took, from the rollout's transitions: from its deployment (``start`` or
    ``next_wave``) to the next wave's or the rollout's end (completed, aborted, paused)."""
    if not rollout:
        return []
    starts = wave_starts(rollout)
    end: float | None = None
    for t in rollout.get("transitions") or []:
        if t["to_state"] in ("completed", "aborted", "paused") and end is None:
            end = _dt(t["at"]).timestamp()
    out: list[float | None] = []
    for i in range(len(rollout.get("waves") or [])):
        if i not in starts:
            out.append(None)
            continue
        nxt = starts.get(i + 1, end)
        out.append(round(nxt - starts[i], 2) if nxt is not None else None)
    return out


def population_gates(
    db_url: str | None,
    rollout_body: dict[str, Any] | None,
    model: str | None,
    version: int | None,
    wave_targets: dict[int, list[dict[str, Any]]],
    devices: set[str],
    activated_at: dict[str, float],
) -> list[dict[str, Any]]:
    """Per wave, the telemetry gates on ``devices`` alone (every row until the run ended), by the controller's
    code on the controller's database (SQLite: read once the controller stopped). ``activated_at``: when
    each device was first seen serving the wave's version (it may have been rolled back since)."""
    if not db_url or not rollout_body or model is None or version is None or not devices:
        return []
    from sqlalchemy import create_engine

    from controller.rollouts import gates
    from controller.rollouts.plan import RolloutCreate

    body = dict(rollout_body)
    body["version"] = version
    spec = RolloutCreate.model_validate(body).gates
    engine = create_engine(db_url)
    out = []
    try:
        for wave in sorted(wave_targets):
            activated = {
                t["device_id"]: datetime.fromtimestamp(activated_at[t["device_id"]], UTC)
                for t in wave_targets[wave]
                if t["device_id"] in devices and t["device_id"] in activated_at
            }
            results = gates.telemetry_gates(engine, spec, model, version, activated) if activated else []
            out.append(
                {
                    "wave": wave + 1,
                    "devices": len(activated),
                    "gates": {
                        r.name: {"value": _round(r.value), "status": r.status, "samples": r.samples} for r in results
                    },
                }
            )
    finally:
        engine.dispose()
    return out


def _dt(value: str | datetime) -> datetime:
    t = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def measured_profile(
    db_url: str,
    devices: set[str],
    variant_names: dict[tuple[str, int], str],
    download_rates: dict[tuple[str, str, str], list[float]],
    warmup_s: float = 3.0,
) -> list[dict[str, Any]]:
    """Per (model, version key, variant) served by the real agents: latency p50/p95 from their telemetry's
    histograms (warm-up intervals left out), median RSS (process and model), download rate.

    ``variant_names`` maps (model, version number) to the scenario's version key; ``download_rates``
    (model, key, variant) to bytes per second measured per device.
    """
    from sqlalchemy import create_engine, select

    from controller.db.models import TelemetryRecord, table

    t = table(TelemetryRecord)
    engine = create_engine(db_url)
    buckets: dict[tuple[str, str, str], Counter[int]] = {}
    rss: dict[tuple[str, str, str], list[float]] = {}
    model_rss: dict[tuple[str, str, str], list[float]] = {}
    seen: dict[tuple[str, str, str], set[str]] = {}
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(t.c.device_id, t.c.data, t.c.rss_bytes).where(t.c.device_id.in_(sorted(devices)))
            )
            for row in rows:
                data = row.data if isinstance(row.data, dict) else json.loads(row.data)
                ref = data.get("model") or {}
                key_name = variant_names.get((str(ref.get("model")), int(ref.get("version") or 0)))
                if not key_name or not ref.get("variant"):
                    continue
                serving = data.get("serving_s")
                if serving is not None and serving - float(data.get("interval_s") or 0) < warmup_s:
                    continue
                key = (str(ref["model"]), key_name, str(ref["variant"]))
                latency = ((data.get("inference") or {}).get("latency") or {}).get("buckets") or []
                counter = buckets.setdefault(key, Counter())
                for index, count in latency:
                    counter[int(index)] += int(count)
                if row.rss_bytes:
                    rss.setdefault(key, []).append(float(row.rss_bytes))
                if data.get("model_rss_bytes"):
                    model_rss.setdefault(key, []).append(float(data["model_rss_bytes"]))
                seen.setdefault(key, set()).add(row.device_id)
    finally:
        engine.dispose()
    out = []
    for key in sorted(set(buckets) | set(download_rates)):
        model, version, variant = key
        hist = sorted(buckets.get(key, Counter()).items())
        entry: dict[str, Any] = {"model": model, "version": version, "variant": variant}
        if sum(c for _, c in hist):
            entry["latency_ms_p50"] = round(quantile_from_buckets(hist, 0.5), 3)
            entry["latency_ms_p95"] = round(quantile_from_buckets(hist, 0.95), 3)
            entry["inferences"] = sum(c for _, c in hist)
        if rss.get(key):
            entry["rss_bytes"] = int(statistics.median(rss[key]))
        if model_rss.get(key):
            entry["model_rss_bytes"] = int(statistics.median(model_rss[key]))
        if download_rates.get(key):
            entry["download_bytes_per_s"] = round(statistics.median(download_rates[key]))
        entry["devices"] = len(seen.get(key, set()))
        out.append(entry)
    return out


def latency_stalls(db_url: str, devices: set[str], factor: float = 5.0) -> dict[str, Any]:
    """How often the devices' latency jumped at once, from their telemetry in the controller's database:
    each report's p50, the median of them all, and the reports (and distinct seconds) whose p50 exceeds
    ``factor`` times that median. On real agents sharing one machine such stalls come from its other work
    (every agent at once); the gates' after/before p95 ratio swings with them."""
    from sqlalchemy import create_engine, select

    from controller.db.models import TelemetryRecord, table

    t = table(TelemetryRecord)
    engine = create_engine(db_url)
    p50s: list[tuple[datetime, float]] = []
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(t.c.ts, t.c.data).where(t.c.device_id.in_(sorted(devices))))
            for row in rows:
                data = row.data if isinstance(row.data, dict) else json.loads(row.data)
                hist = ((data.get("inference") or {}).get("latency") or {}).get("buckets") or []
                if sum(int(c) for _, c in hist) >= 5:
                    p50s.append((_dt(row.ts), quantile_from_buckets(sorted((int(i), int(c)) for i, c in hist), 0.5)))
    finally:
        engine.dispose()
    if not p50s:
        return {"reports": 0}
    median = statistics.median(v for _, v in p50s)
    stalled = [(at, v) for at, v in p50s if v > factor * median]
    return {
        "reports": len(p50s),
        "median_p50_ms": round(median, 3),
        "stalled_reports": len(stalled),
        "stalled_share": round(len(stalled) / len(p50s), 4),
        "stalled_seconds": len({at.replace(microsecond=0) for at, _ in stalled}),
        "worst_p50_ms": round(max(v for _, v in p50s), 3),
        "factor": factor,
    }


def write_profile(path: Any, entries: list[dict[str, Any]], source: dict[str, Any]) -> None:
    """Write a recorded profile (``slmfleet simulate --record-profile``) as YAML."""
    from pathlib import Path

    import yaml

    doc = {"recorded_from": source, "variants": entries}
    text = "# per-variant measurements of real agents, replayed by a scenario's calibration.profile\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + yaml.safe_dump(doc, sort_keys=False))


def load_profile(path: Any) -> dict[tuple[str, str, str], dict[str, Any]]:
    """A recorded profile: (model, version key, variant) -> its measurements."""
    from pathlib import Path

    import yaml

    from simulations.errors import ScenarioError

    try:
        doc = yaml.safe_load(Path(path).read_text())
        entries = doc["variants"]
        return {(str(e["model"]), str(e["version"]), str(e["variant"])): dict(e) for e in entries}
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ScenarioError(f"cannot read the recorded profile {path}: {exc}") from None

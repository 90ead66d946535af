"""The self-contained HTML report of a run: outcome, assertions, charts (inline SVG), transitions, faults."""

from __future__ import annotations

import json
from datetime import datetime
from html import escape
from typing import Any

from simulations.svg import Marker, lines, stacked_area

STATE_COLORS = {
    "not started": "#d9d9d9",
    "idle": "#bdbdbd",
    "downloading": "#6baed6",
    "verifying": "#3182bd",
    "staged": "#08519c",
    "shadow": "#9e66c3",
    "activating": "#f2c94c",
    "active": "#2a9d4b",
    "rolling_back": "#f08c3a",
    "rolled_back": "#8c6d31",
    "cancelled": "#969696",
    "failed": "#d62728",
}
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1000px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 14px; margin: 14px 0 4px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 4px; color: #fff; font-weight: 600; }
.pass { background: #2a9d4b; } .fail { background: #d62728; }
table { border-collapse: collapse; margin: 6px 0; } td, th { padding: 3px 10px 3px 0; text-align: left;
        vertical-align: top; } th { font-weight: 600; border-bottom: 1px solid #ddd; }
td.num { text-align: right; } .ok { color: #2a9d4b; } .bad { color: #d62728; font-weight: 600; }
.muted { color: #777; } .grid { display: grid; grid-template-columns: repeat(4, auto); gap: 2px 24px; }
svg { display: block; margin: 4px 0 12px; } svg text { font: 11px system-ui, sans-serif; fill: #444; }
svg text.axis { fill: #777; } code { background: #f4f4f4; padding: 1px 4px; border-radius: 3px; }
"""


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _since(iso: str | None, t0: float) -> float | None:
    at = _epoch(iso)
    return round(at - t0, 1) if at is not None else None


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return escape(str(v))


def _text(v: Any) -> str:
    """A value for a person, not a Python repr: ``broadcast 25, repair 0``, ``1.36``, ``a, b``."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_text(x)}" for k, x in v.items()) or "-"
    if isinstance(v, list | tuple | set):
        return ", ".join(_text(x) for x in v) or "-"
    return str(v)


def _wave_number(index: Any) -> str:
    """Waves are counted from 1 in the report, as in the CLI and the dashboard."""
    return str(index + 1) if isinstance(index, int) else "-"


def render_html(report: dict[str, Any]) -> str:
    s = report["scenario"]
    ok = report.get("ok", False)
    rollout = report.get("rollout") or {}
    timeline = report.get("timeline") or []
    t0 = (timeline[0]["at"] - timeline[0]["t"]) if timeline else 0.0
    markers = []
    for tr in rollout.get("transitions") or []:
        at = _epoch(tr.get("at"))
        if at is not None and tr["to_state"] in ("deploying", "gating", "aborting", "completed", "aborted", "paused"):
            color = {"aborting": "#d62728", "aborted": "#d62728", "completed": "#2a9d4b"}.get(tr["to_state"], "#888")
            markers.append(Marker(at - t0, f"wave {tr['wave'] + 1}: {tr['from_state']} -> {tr['to_state']}", color))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>slmfleet simulation: {escape(s['name'])}</title><style>{CSS}</style></head><body>",
        f"<h1>Simulation <code>{escape(s['name'])}</code> "
        f"<span class='badge {'pass' if ok else 'fail'}'>{'PASS' if ok else 'FAIL'}</span></h1>",
        f"<p class='muted'>{escape(s.get('description') or '')}</p>",
        _summary(report),
        "<h2>Expectations</h2>",
        _table(
            ["", "check", "expected", "actual"],
            [
                [
                    f"<span class='{'ok' if a['ok'] else 'bad'}'>{'✓' if a['ok'] else '✗'}</span>",
                    escape(a["name"]),
                    escape(_text(a["expected"])),
                    escape(_text(a["actual"])),
                ]
                for a in report.get("assertions", [])
            ],
        ),
    ]
    if report.get("error"):
        parts.append(f"<p class='bad'>error: {escape(report['error'])}</p>")
    for note in report.get("notes") or []:
        parts.append(f"<p class='muted'>note: {escape(note)}</p>")
    parts.append("<h2>Devices per state over time</h2>")
    parts.append(
        "<p class='muted'>The devices' own deployment state (from their persisted records), sampled every "
        "half second; dashed lines mark the rollout's transitions (hover for details). Time 0 is the "
        "rollout's creation; before it the fleet serves its installed model (the gates' baseline).</p>"
    )
    parts.append(_states_chart(timeline, "states", markers, "the whole fleet"))
    for i, wave in enumerate(rollout.get("waves") or []):
        name = wave.get("name") or f"wave {i + 1}"
        parts.append(f"<h3>Wave {i + 1}: {escape(name)} ({wave['devices']} devices)</h3>")
        parts.append(_states_chart(timeline, i, markers, name))
    parts.append("<h2>Download progress</h2>")
    parts.append(_download_charts(timeline, rollout, markers))
    gates = _gate_charts(timeline, markers)
    if gates:
        parts.append("<h2>Gates against their thresholds</h2>")
        parts.append(
            "<p class='muted'>The controller's gate values while it judged each wave (points: pass green, "
            "waiting yellow, fail red); dashed: the threshold.</p>"
        )
        parts.append(gates)
    if report.get("populations"):
        parts.append(_populations_section(report["populations"]))
    if report.get("calibration"):
        parts.append(_calibration_section(report["calibration"]))
    parts.append("<h2>Rollout transitions</h2>")
    parts.append(
        _table(
            ["t (s)", "wave", "transition", "reason"],
            [
                [
                    _num(_since(t["at"], t0)),
                    t["wave"] + 1,
                    escape(f"{t['from_state'] or '-'} → {t['to_state']}"),
                    escape(t["reason"]),
                ]
                for t in rollout.get("transitions") or []
            ],
            numeric={0},
        )
    )
    parts.append(_devices_section(report))
    parts.append(_faults_section(report, t0))
    parts.append(
        "<h2>Scenario</h2><pre>"
        + escape(json.dumps({k: s[k] for k in ("devices", "profiles", "faults", "rollout")}, indent=1))
        + "</pre>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(report: dict[str, Any]) -> str:
    rollout = report.get("rollout") or {}
    res = report.get("resources") or {}
    fleet = report.get("fleet") or {}
    items = [
        ("devices", report["scenario"]["devices"]),
        ("worker processes", (report.get("infrastructure") or {}).get("worker_processes")),
        ("rollout", f"{rollout.get('state', '-')} (wave {_wave_number(rollout.get('wave_index'))})"),
        ("rollout duration", f"{report.get('rollout_duration_s')} s"),
        ("controller CPU during rollout", f"{res.get('controller_cpu_s_during_rollout')} s"),
        ("broker CPU during rollout", f"{res.get('broker_cpu_s_during_rollout')} s"),
        ("received by devices", f"{fleet.get('bytes_in', 0) / 1e6:.1f} MB"),
        ("broker", f"{(report.get('infrastructure') or {}).get('broker_engine')}"),
    ]
    cells = "".join(f"<div class='muted'>{escape(k)}</div><div>{escape(_text(v))}</div>" for k, v in items)
    reason = rollout.get("reason")
    return f"<div class='grid'>{cells}</div>" + (f"<p>{escape(reason)}</p>" if reason else "")


def _states_chart(timeline: list[dict[str, Any]], which: str | int, markers: list[Marker], title: str) -> str:
    if which == "states":
        rows = [{k: v for k, v in s["states"].items() if k != "offline"} for s in timeline]
    else:
        rows = [s["waves"][which] if which < len(s["waves"]) else {} for s in timeline]  # type: ignore[operator]
        first = next((i for i, r in enumerate(rows) if r), len(rows))
        timeline, rows = timeline[first:], rows[first:]
    xs = [s["t"] for s in timeline]
    names = [n for n in STATE_COLORS if any(r.get(n) for r in rows)]
    series = {n: [float(r.get(n, 0)) for r in rows] for n in names}
    chart = stacked_area(xs, series, STATE_COLORS, title=f"devices per state: {title}", markers=markers)
    if which == "states" and any(s["states"].get("offline") for s in timeline):
        chart += lines(
            xs,
            {"offline": [float(s["states"].get("offline", 0)) for s in timeline]},
            {"offline": "#d62728"},
            title="devices offline",
            y_label="devices",
            y_min=0,
            markers=markers,
        )
    return chart


def _download_charts(timeline: list[dict[str, Any]], rollout: dict[str, Any], markers: list[Marker]) -> str:
    xs = [s["t"] for s in timeline]
    waves = rollout.get("waves") or []
    series: dict[str, list[float | None]] = {}
    colors: dict[str, str] = {}
    for i, wave in enumerate(waves):
        name = wave.get("name") or f"wave {i + 1}"
        values = [
            (s["download"][i] * 100 if s["download"][i] is not None else None) if i < len(s["download"]) else None
            for s in timeline
        ]
        if any(v is not None for v in values):
            series[name] = values
            colors[name] = PALETTE[i % len(PALETTE)]
    if series:
        out = lines(
            xs,
            series,
            colors,
            title="mean download progress of the devices downloading",
            y_label="%",
            y_min=0,
            y_max=100,
            markers=markers,
        )
    else:  # an empty chart would say "no data", as if nothing had been downloaded
        out = (
            "<p class='muted'>Every download started and finished between two samples (0.5 s apart), so there"
            " is no progress to plot; the bytes the fleet received are below.</p>"
        )
    out += lines(
        xs,
        {"MB received": [s["mb_in"] for s in timeline]},
        {"MB received": "#1f77b4"},
        title="bytes received by the fleet",
        y_label="MB",
        y_min=0,
        markers=markers,
    )
    return out


def _gate_charts(timeline: list[dict[str, Any]], markers: list[Marker]) -> str:
    names: list[str] = []
    for s in timeline:
        for g in s["gates"]:
            if g["name"] not in names:
                names.append(g["name"])
    out = []
    for name in names:
        xs, values, status, thresholds = [], [], [], []
        for s in timeline:
            g = next((g for g in s["gates"] if g["name"] == name), None)
            if g is None:
                continue
            xs.append(s["t"])
            values.append(g["value"])
            status.append(g["status"])
            if g["threshold"] is not None:
                thresholds.append(g["threshold"])
        if not xs or all(v is None for v in values):
            continue
        comparison = next((g["comparison"] for s in timeline for g in s["gates"] if g["name"] == name), "<=")
        limit = {f"threshold ({comparison})": thresholds[-1]} if thresholds else {}
        out.append(f"<h3>{escape(name)}</h3>")
        out.append(
            lines(
                xs,
                {name: values},
                {name: "#333", **{k: "#d62728" for k in limit}},
                title=f"gate {name}",
                thresholds=limit,
                markers=markers,
                points={name: status},
            )
        )
    return "\n".join(out)


def _devices_section(report: dict[str, Any]) -> str:
    devices = report.get("devices") or {}
    out = ["<h2>Devices at the end</h2>"]
    rows = []
    for profile, counts in (devices.get("by_profile") or {}).items():
        rows.append([escape(profile), escape(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))])
    out.append(_table(["profile", "serving (model version variant: devices)"], rows))
    out.append(
        "<h3>Deployment state</h3>"
        + _table(
            ["state", "devices"],
            [[escape(k), v] for k, v in sorted((devices.get("by_state") or {}).items())],
            numeric={1},
        )
    )
    reasons = report.get("failure_reasons") or {}
    if reasons:
        out.append("<h3>What the controller was told (failed, rolled back, cancelled)</h3>")
        out.append(_table(["devices", "reason"], [[v, escape(k)] for k, v in reasons.items()], numeric={0}))
    fleet = report.get("fleet") or {}
    if fleet:
        out.append("<h3>Fleet counters</h3>")
        out.append(_table(["counter", "value"], [[escape(k), v] for k, v in sorted(fleet.items())], numeric={1}))
    res = report.get("resources") or {}
    out.append("<h3>Resources</h3>")
    out.append(_table(["", "value"], [[escape(k), escape(_text(v))] for k, v in res.items()]))
    return "\n".join(out)


def _faults_section(report: dict[str, Any], t0: float) -> str:
    faults = report.get("faults") or {}
    counts = faults.get("counts") or {}
    if not counts:
        return "<h2>Faults</h2><p class='muted'>none injected</p>"
    out = [
        "<h2>Faults</h2>",
        _table(["fault", "times fired"], [[escape(k), v] for k, v in sorted(counts.items())], numeric={1}),
    ]
    events = faults.get("events") or []
    if events:
        rows = [[_num(round(e[0] - t0, 1)), escape(e[1]), escape(e[2]), escape(e[3])] for e in events[:200]]
        out.append("<h3>First events</h3>" + _table(["t (s)", "device", "fault", "detail"], rows, numeric={0}))
    return "\n".join(out)


def _populations_section(pops: dict[str, Any]) -> str:
    """Real agents and virtual devices side by side: per wave, times, gates, final states."""
    out = ["<h2>Real agents and virtual devices</h2>"]
    names = [n for n in ("real", "virtual") if n in pops]
    out.append(
        _table(
            ["", *names],
            [
                ["devices", *[pops[n]["devices"] for n in names]],
                ["profiles", *[escape(_text(pops[n]["profiles"])) for n in names]],
                ["final states", *[escape(_text(pops[n]["final_states"])) for n in names]],
                ["serving at the end", *[escape(_text(pops[n]["final_models"])) for n in names]],
            ],
        )
    )
    rows = []
    waves = sorted({w["wave"] for n in names for w in pops[n]["waves"]})
    for wave in waves:
        for n in names:
            w = next((x for x in pops[n]["waves"] if x["wave"] == wave), None)
            if w is None or not w["devices"]:
                continue
            rows.append(
                [
                    wave,
                    n,
                    w["devices"],
                    _num(w["download_s"]["median"]),
                    _num(w["download_s"]["max"]),
                    _num(w["active_s"]["median"]),
                    _num(w["done_s"]["median"]),
                    _num(w["duration_s"]),
                    escape(_text(w["final"])),
                ]
            )
    out.append("<h3>Per wave (seconds after the wave started deploying; sampled, about 1 s resolution)</h3>")
    out.append(
        _table(
            [
                "wave",
                "population",
                "devices",
                "download median",
                "download max",
                "active median",
                "final state median",
                "wave done",
                "final",
            ],
            rows,
            numeric={2, 3, 4, 5, 6, 7},
        )
    )
    gate_rows = []
    for n in names:
        for w in pops[n].get("gates") or []:
            for gate, g in w["gates"].items():
                gate_rows.append([w["wave"], n, escape(gate), _num(g["value"]), escape(g["status"]), g["samples"]])
    if gate_rows:
        out.append("<h3>Gates per population (the controller's gate code on each population's devices)</h3>")
        out.append(_table(["wave", "population", "gate", "value", "status", "samples"], gate_rows, numeric={3, 5}))
    missing = pops.get("faults_not_applied") or []
    if missing:
        out.append("<h3>Faults not applied to real agents</h3>")
        out.append(
            _table(
                ["fault", "kind", "real agents it selected", "why"],
                [[f["fault"], escape(f["kind"]), f["real_agents"], escape(f["why"])] for f in missing],
                numeric={2},
            )
        )
    return "\n".join(out)


def _calibration_section(cal: dict[str, Any]) -> str:
    out = ["<h2>Calibration of the virtual devices</h2>"]
    out.append(
        _table(
            ["value", "source"],
            [
                ["latency", escape(cal["latency"])],
                ["memory", escape(cal["memory"])],
                ["download", escape(cal["download"])],
                ["recorded profile", escape(_text(cal.get("profile")))],
                ["reference CPU", escape(cal.get("reference_cpu", ""))],
            ],
        )
    )
    rows = [
        [
            escape(k),
            _num(v.get("latency_ms_p50")),
            _num(v.get("latency_ms_p95")),
            _num((v.get("peak_rss_bytes") or 0) / 2**20) if v.get("peak_rss_bytes") else "",
            _num(v.get("used_latency_ms")),
        ]
        for k, v in sorted((cal.get("variants") or {}).items())
    ]
    out.append(
        _table(
            ["variant", "registry p50 ms", "registry p95 ms", "registry peak RSS MiB", "latency used (ms, speed 1.0)"],
            rows,
            numeric={1, 2, 3, 4},
        )
    )
    return "\n".join(out)

"""Small inline-SVG charts for the report: stacked areas and lines over time, with markers and thresholds.

No JavaScript and no external files: the report must open anywhere, offline, and print.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 760, 230
LEFT, RIGHT, TOP, BOTTOM = 52, 150, 14, 30


@dataclass
class Marker:
    x: float
    label: str
    color: str = "#888"


def _nice(span: float, ticks: int = 5) -> float:
    if span <= 0:
        return 1.0
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw))
    for step in (1, 2, 2.5, 5, 10):
        if raw <= step * mag:
            return step * mag
    return 10 * mag


def _fmt(v: float) -> str:
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if float(v).is_integer():
        return f"{v:.0f}"
    return f"{v:.3g}"


class _Frame:
    def __init__(self, x0: float, x1: float, y0: float, y1: float) -> None:
        if x1 <= x0:
            x1 = x0 + 1.0
        if y1 <= y0:
            y1 = y0 + 1.0
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1
        self.w = WIDTH - LEFT - RIGHT
        self.h = HEIGHT - TOP - BOTTOM

    def x(self, v: float) -> float:
        return LEFT + (v - self.x0) / (self.x1 - self.x0) * self.w

    def y(self, v: float) -> float:
        return TOP + self.h - (v - self.y0) / (self.y1 - self.y0) * self.h

    def axes(self, x_label: str, y_label: str) -> list[str]:
        out = [f'<rect x="{LEFT}" y="{TOP}" width="{self.w}" height="{self.h}" fill="#fff" stroke="#ccc"/>']
        step = _nice(self.y1 - self.y0, 4)
        v = math.ceil(self.y0 / step) * step
        while v <= self.y1 + 1e-9:
            y = self.y(v)
            out.append(f'<line x1="{LEFT}" x2="{LEFT + self.w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
            v += step
        step = _nice(self.x1 - self.x0, 6)
        v = math.ceil(self.x0 / step) * step
        while v <= self.x1 + 1e-9:
            x = self.x(v)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP + self.h}" y2="{TOP + self.h + 4}" stroke="#999"/>')
            out.append(f'<text x="{x:.1f}" y="{TOP + self.h + 16}" text-anchor="middle">{_fmt(v)}</text>')
            v += step
        out.append(
            f'<text x="{LEFT + self.w / 2:.0f}" y="{HEIGHT - 2}" text-anchor="middle" class="axis">'
            f"{escape(x_label)}</text>"
        )
        out.append(
            f'<text x="12" y="{TOP + self.h / 2:.0f}" text-anchor="middle" class="axis" '
            f'transform="rotate(-90 12 {TOP + self.h / 2:.0f})">{escape(y_label)}</text>'
        )
        return out

    def markers(self, markers: Sequence[Marker]) -> list[str]:
        out = []
        for m in markers:
            if not self.x0 <= m.x <= self.x1:
                continue
            x = self.x(m.x)
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + self.h}" stroke="{m.color}" '
                f'stroke-dasharray="3 3"><title>{escape(m.label)}</title></line>'
            )
        return out


def _legend(items: Sequence[tuple[str, str]], dashed: Sequence[str] = ()) -> list[str]:
    out = []
    for i, (name, color) in enumerate(items):
        y = TOP + 8 + i * 16
        x = WIDTH - RIGHT + 12
        if name in dashed:
            out.append(
                f'<line x1="{x}" x2="{x + 12}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" stroke-width="2" '
                'stroke-dasharray="4 3"/>'
            )
        else:
            out.append(f'<rect x="{x}" y="{y - 9}" width="12" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + 17}" y="{y}">{escape(name)}</text>')
    return out


def _svg(parts: list[str], title: str) -> str:
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" role="img" aria-label="{escape(title)}">\n{body}\n</svg>'
    )


def stacked_area(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    colors: dict[str, str],
    *,
    title: str,
    x_label: str = "seconds since the rollout was created",
    y_label: str = "devices",
    markers: Sequence[Marker] = (),
) -> str:
    """Layers stacked in the order of ``series`` (each a value per x)."""
    if not xs:
        return _svg([f'<text x="{LEFT}" y="40">no data</text>'], title)
    totals = [sum(s[i] for s in series.values()) for i in range(len(xs))]
    frame = _Frame(min(xs), max(xs), 0.0, max(max(totals), 1.0))
    parts = frame.axes(x_label, y_label)
    base = [0.0] * len(xs)
    for name, values in series.items():
        top = [b + v for b, v in zip(base, values, strict=True)]
        if any(values):
            upper = " ".join(f"{frame.x(x):.1f},{frame.y(t):.1f}" for x, t in zip(xs, top, strict=True))
            lower = " ".join(
                f"{frame.x(x):.1f},{frame.y(b):.1f}" for x, b in zip(reversed(xs), reversed(base), strict=True)
            )
            parts.append(
                f'<polygon points="{upper} {lower}" fill="{colors.get(name, "#999")}" fill-opacity="0.9">'
                f"<title>{escape(name)}</title></polygon>"
            )
        base = top
    parts += frame.markers(markers)
    parts += _legend([(n, colors.get(n, "#999")) for n in series if any(series[n])])
    return _svg(parts, title)


def lines(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    colors: dict[str, str],
    *,
    title: str,
    x_label: str = "seconds since the rollout was created",
    y_label: str = "",
    y_min: float | None = None,
    y_max: float | None = None,
    thresholds: dict[str, float] | None = None,
    markers: Sequence[Marker] = (),
    points: dict[str, Sequence[str | None]] | None = None,
) -> str:
    """One line per series (None values break the line); dashed horizontal thresholds."""
    values = [v for s in series.values() for v in s if v is not None] + list((thresholds or {}).values())
    if not xs or not values:
        return _svg([f'<text x="{LEFT}" y="40">no data</text>'], title)
    lo = min(values) if y_min is None else y_min
    hi = max(values) if y_max is None else y_max
    pad = (hi - lo) * 0.08 or 1.0
    frame = _Frame(min(xs), max(xs), lo if y_min is not None else lo - pad, hi + pad if y_max is None else hi)
    parts = frame.axes(x_label, y_label)
    for name, limit in (thresholds or {}).items():
        y = frame.y(limit)
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + frame.w}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{colors.get(name, "#c00")}" stroke-width="1.5" stroke-dasharray="6 4">'
            f"<title>{escape(name)} {limit:g}</title></line>"
        )
    status_color = {"pass": "#2a9d4b", "fail": "#d62728", "waiting": "#e0a800", "off": "#999"}
    for name, ys in series.items():
        segments: list[list[str]] = [[]]
        for x, maybe in zip(xs, ys, strict=True):
            if maybe is None:
                if segments[-1]:
                    segments.append([])
                continue
            segments[-1].append(f"{frame.x(x):.1f},{frame.y(maybe):.1f}")
        for seg in segments:
            if len(seg) > 1:
                parts.append(
                    f'<polyline points="{" ".join(seg)}" fill="none" stroke="{colors.get(name, "#333")}" '
                    f'stroke-width="2"><title>{escape(name)}</title></polyline>'
                )
            elif len(seg) == 1:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{colors.get(name, "#333")}"/>')
        for x, value, status in zip(xs, ys, (points or {}).get(name, [None] * len(xs)), strict=True):
            if value is not None and status is not None:
                parts.append(
                    f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(value):.1f}" r="2.2" '
                    f'fill="{status_color.get(status, "#333")}"><title>{escape(status)}</title></circle>'
                )
    parts += frame.markers(markers)
    items = [(n, colors.get(n, "#333")) for n in series] + [(n, colors.get(n, "#c00")) for n in (thresholds or {})]
    parts += _legend(items, dashed=list(thresholds or {}))
    return _svg(parts, title)

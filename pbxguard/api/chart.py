"""A tiny chart library: stacked bars as inline SVG, rendered on the server.

No JavaScript and no external asset: the page works offline and under a strict Content-Security-Policy
(presentation attributes only, no `style` attributes).  Every bar has a native tooltip (`<title>`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import date
from html import escape

from pbxguard.policy.model import Reason

REASON_COLORS: dict[str, str] = {
    Reason.UNKNOWN_CAMPAIGN: "#6b7280",
    Reason.SECTOR_BANNED: "#7c2d12",
    Reason.CALLER_ID_MISSING: "#4c1d95",
    Reason.CALLER_ID_FORBIDDEN: "#6d28d9",
    Reason.CALLER_ID_MOBILE: "#8b5cf6",
    Reason.CALLER_ID_NOT_NPV: "#a78bfa",
    Reason.CALLER_ID_NOT_AUTHORIZED: "#c084fc",
    Reason.INVALID_DESTINATION: "#374151",
    Reason.BLOCTEL_REGISTERED: "#9f1239",
    Reason.BLOCTEL_STALE: "#e11d48",
    Reason.NO_CONSENT: "#dc2626",
    Reason.OPPOSED: "#f97316",
    Reason.REFUSAL_QUIET_PERIOD: "#f59e0b",
    Reason.WEEKEND: "#0ea5e9",
    Reason.PUBLIC_HOLIDAY: "#1d4ed8",
    Reason.OUTSIDE_HOURS: "#14b8a6",
    Reason.FREQUENCY_CAP: "#65a30d",
    Reason.STORE_UNAVAILABLE: "#111827",
}
FALLBACK_COLOR = "#9ca3af"


def color(series: str) -> str:
    return REASON_COLORS.get(series, FALLBACK_COLOR)


def nice_step(maximum: float, ticks: int = 4) -> int:
    """A round step (1, 2, 5 × 10^n) so that `ticks` steps cover `maximum`."""
    raw = max(maximum, 1) / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        step = factor * magnitude
        if step >= raw:
            return max(1, int(step))
    return max(1, int(10 * magnitude))  # pragma: no cover


def swatch(series: str, size: int = 12) -> str:
    return (
        f'<svg class="swatch" width="{size}" height="{size}" aria-hidden="true">'
        f'<rect width="{size}" height="{size}" rx="2" fill="{color(series)}"/></svg>'
    )


def stacked_bars(
    days: Sequence[date],
    values: Mapping[date, Mapping[str, int]],
    order: Sequence[str],
    *,
    width: int = 960,
    height: int = 280,
    title: str = "Blocked calls by reason per day",
) -> str:
    """One bar per day, one stacked segment per series (in `order`, first at the bottom)."""
    left, right, top, bottom = 44, 8, 12, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(values.get(day, {}).get(s, 0) for s in order) for day in days]
    peak = max(totals, default=0)
    step = nice_step(peak)
    y_max = max(step, math.ceil(peak / step) * step)
    band = plot_w / max(len(days), 1)
    bar_w = max(1.0, band * 0.72)

    def y(value: float) -> float:
        return top + plot_h - plot_h * value / y_max

    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for tick in range(0, y_max + 1, step):
        ty = y(tick)
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#e5e7eb" stroke-width="1"/>'
            f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end" font-size="11" fill="#6b7280">{tick}</text>'
        )
    label_every = max(1, math.ceil(len(days) / 15))
    for index, day in enumerate(days):
        x = left + band * index + (band - bar_w) / 2
        base = 0
        for series in order:
            n = values.get(day, {}).get(series, 0)
            if not n:
                continue
            y_top, y_bottom = y(base + n), y(base)
            out.append(
                f'<rect class="bar" x="{x:.1f}" y="{y_top:.1f}" width="{bar_w:.1f}" '
                f'height="{max(y_bottom - y_top, 0.5):.1f}" fill="{color(series)}" '
                f'data-reason="{escape(series)}" data-day="{day.isoformat()}">'
                f"<title>{day.isoformat()} — {escape(series)}: {n}</title></rect>"
            )
            base += n
        if (len(days) - 1 - index) % label_every == 0:  # aligned on the last day, always labelled
            weekend = day.weekday() >= 5
            out.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{height - bottom + 16}" text-anchor="middle" font-size="11" '
                f'fill="{"#9ca3af" if weekend else "#374151"}">{day:%d/%m}</text>'
            )
    out.append(
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#9ca3af"/>'
    )
    if peak == 0:
        out.append(
            f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" text-anchor="middle" font-size="14" '
            'fill="#6b7280">no blocked call in this period</text>'
        )
    out.append("</svg>")
    return "".join(out)

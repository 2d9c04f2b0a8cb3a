"""Learning curves as inline SVG: one polyline per series, axes in round numbers."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")


def line_chart(series: Mapping[str, Mapping[int, float]], *, title: str, y_label: str,
               width: int = 640, height: int = 260) -> str:
    """An SVG line chart of ``name -> {round: value}`` (values in [0, 1] fit best)."""
    points = [(r, v) for values in series.values() for r, v in values.items()]
    if not points:
        return f'<p class="empty">{escape(title)}: no values yet.</p>'
    left, right, top, bottom = 48, 140, 24, 32
    rounds = [r for r, _ in points]
    low_x, high_x = min(rounds), max(max(rounds), min(rounds) + 1)
    values = [v for _, v in points]
    low_y, high_y = min(0.0, min(values)), max(1.0, max(values))

    def x(r: float) -> float:
        return left + (r - low_x) / (high_x - low_x) * (width - left - right)

    def y(v: float) -> float:
        return top + (high_y - v) / (high_y - low_y) * (height - top - bottom)

    parts = [f'<svg class="chart" role="img" aria-label="{escape(title)}: {escape(y_label)} '
             f'by round" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}">',
             f'<text x="{left}" y="14" class="title">{escape(title)}</text>',
             f'<line x1="{left}" y1="{y(low_y):.1f}" x2="{width - right}" y2="{y(low_y):.1f}" '
             'stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{y(low_y):.1f}" stroke="#888"/>']
    for tick in (low_y, (low_y + high_y) / 2, high_y):
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">'
                     f'{tick:.2f}</text>')
    for tick in sorted({low_x, high_x, (low_x + high_x) // 2}):
        parts.append(f'<text x="{x(tick):.1f}" y="{height - 12}" text-anchor="middle">'
                     f'{tick}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 1}" '
                 f'text-anchor="middle">round</text>')
    for index, (name, line) in enumerate(sorted(series.items())):
        colour = PALETTE[index % len(PALETTE)]
        coords = " ".join(f"{x(r):.1f},{y(v):.1f}" for r, v in sorted(line.items()))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{coords}"><title>{escape(name)}</title></polyline>')
        for r, v in sorted(line.items()):
            parts.append(f'<circle cx="{x(r):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>')
        parts.append(f'<text x="{width - right + 8}" y="{top + 14 * index + 10}" '
                     f'fill="{colour}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)

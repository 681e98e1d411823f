"""A dependency-free SVG line plot for benchmark results (no matplotlib in the engines' venvs): one line per
series over shared x values placed evenly (context lengths double from one to the next), a linear y axis
from 0 to ``y_max`` or a log10 one."""

from __future__ import annotations

import math
from pathlib import Path

_COLORS = ["#000000", "#1f77b4", "#4a9fd8", "#9ccbec", "#d62728", "#e8706f", "#f4b6b5", "#2ca02c"]


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    return [hi * i / 4 for i in range(5)]


def line_plot(series: dict[str, list[tuple[int, float]]], path: Path, *, x_label: str, y_label: str,
              y_max: float | None = None, log_y: bool = False, dashed: tuple[str, ...] = ()) -> None:
    """Write ``series`` (name -> [(x, y)]) to ``path``. ``y_max``: linear axis top (default: the largest y);
    ``log_y``: log10 axis over the data's decades; names starting with one of ``dashed`` are dashed."""
    width, height, left, bottom, top, right = 640, 400, 60, 50, 20, 190
    xs = sorted({x for points in series.values() for x, _ in points})
    ys = [y for points in series.values() for _, y in points if y is not None and (y > 0 or not log_y)]
    lo, hi = (min(ys), max(ys)) if log_y else (0.0, y_max or max(ys))
    ticks = _ticks(lo, hi, log_y)
    y_lo, y_hi = (math.log10(ticks[0]), math.log10(ticks[-1])) if log_y else (0.0, hi)

    def px(x):
        return left + (xs.index(x) / max(1, len(xs) - 1)) * (width - left - right)

    def py(y):
        value = math.log10(y) if log_y else y
        return top + (1 - (value - y_lo) / ((y_hi - y_lo) or 1)) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for y in ticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(y)}" y2="{py(y)}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 8}" y="{py(y) + 4}" text-anchor="end">{y:g}</text>')
    for x in xs:
        parts.append(f'<text x="{px(x)}" y="{height - bottom + 18}" text-anchor="middle">{x}</text>')
    parts.append(f'<text x="{(width - right + left) / 2}" y="{height - 10}" text-anchor="middle">{x_label}</text>')
    parts.append(f'<text x="15" y="{(height - bottom) / 2}" transform="rotate(-90 15 {(height - bottom) / 2})" '
                 f'text-anchor="middle">{y_label}</text>')
    for i, (name, points) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        dash = ' stroke-dasharray="6 3"' if name.startswith(dashed) else ""  # () matches nothing
        coords = " ".join(f"{px(x)},{py(y)}" for x, y in points if y is not None and (y > 0 or not log_y))
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{width - right + 10}" y="{top + 16 * (i + 1)}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")

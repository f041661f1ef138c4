"""Loss curves as a small standalone SVG (no plotting library needed): one polyline per series."""

from __future__ import annotations

from html import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def loss_svg(series: dict[str, list[tuple[int, float]]], title: str, width: int = 640, height: int = 360) -> str:
    """series: name -> [(step, loss)]. Steps on x, loss on y (from 0), a legend at the top right."""
    points = [p for s in series.values() for p in s]
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"></svg>'
    x_max = max(p[0] for p in points) or 1
    y_max = max(p[1] for p in points) * 1.05 or 1.0
    left, right, top, bottom = 56, 16, 32, 40
    w, h = width - left - right, height - top - bottom

    def xy(step: float, loss: float) -> str:
        return f"{left + w * step / x_max:.1f},{top + h * (1 - loss / y_max):.1f}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14">{escape(title)}</text>',
           f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="black"/>',
           f'<text x="{left + w / 2}" y="{height - 8}" text-anchor="middle">step</text>',
           f'<text x="14" y="{top + h / 2}" transform="rotate(-90 14 {top + h / 2})" text-anchor="middle">loss</text>']
    for i in range(5):
        v = y_max * i / 4
        y = top + h * (1 - i / 4)
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + w}" y2="{y:.1f}" stroke="#ddd"/>')
    for i in range(5):
        s = x_max * i / 4
        out.append(f'<text x="{left + w * i / 4:.1f}" y="{top + h + 16}" text-anchor="middle">{s:.0f}</text>')
    for k, (name, pts) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        path = " ".join(xy(s, v) for s, v in pts)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        out.append(f'<text x="{left + w - 4}" y="{top + 14 + 16 * k}" text-anchor="end" fill="{color}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)

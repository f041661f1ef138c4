"""The eval report: Markdown, and a self-contained HTML page (inline SVG, no scripts or downloads) with
the similarity distribution and the worst cases side by side."""

from __future__ import annotations

from html import escape

from keel.evals.metrics import CaseResult, shown

WORST = 10


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


ROWS = [("exact match (A = B)", "exact_match"), ("similarity, mean", "similarity"),
        ("similarity, lowest", "min_similarity"), ("expected answer, A", "expected_a"),
        ("expected answer, B", "expected_b"), ("valid JSON, A", "json_valid_a"), ("valid JSON, B", "json_valid_b"),
        ("tool calls agree", "tools_agree"), ("errors, A", "errors_a"), ("errors, B", "errors_b"),
        ("latency s, A", "latency_a"), ("latency s, B", "latency_b"),
        ("completion tokens, A", "tokens_a"), ("completion tokens, B", "tokens_b")]


def markdown(title: str, a: str, b: str, s: dict, results: list[CaseResult], verdict: list[str]) -> str:
    lines = [f"# {title}", "", f"- A: {a}", f"- B: {b}", f"- {s['cases']} cases, {s['samples']} samples", ""]
    lines += ["| metric | value |", "|---|---|"] + [f"| {name} | {_fmt(s[key])} |" for name, key in ROWS]
    lines += ["", *(f"- {v}" for v in verdict), "", "## Lowest similarity", "",
              "| case | similarity | A | B |", "|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r.similarity)[:WORST]:
        cell = lambda t: shown(t).replace("|", "\\|").replace("\n", " ")[:200]  # noqa: E731
        lines.append(f"| {r.case.id} | {r.similarity:.3f} | {cell(r.a[0])} | {cell(r.b[0])} |")
    return "\n".join(lines) + "\n"


def histogram_svg(values: list[float], width: int = 560, height: int = 220, bins: int = 20) -> str:
    """Counts of similarity values in [0, 1] as bars."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins)))] += 1
    top = max(counts) or 1
    left, bottom, w, h = 40, 30, width - 50, height - 50
    bar = w / bins
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
           f'font-family="sans-serif" role="img" aria-label="similarity distribution">']
    for i, c in enumerate(counts):
        bh = h * c / top
        out.append(f'<rect x="{left + i * bar + 1:.1f}" y="{10 + h - bh:.1f}" width="{bar - 2:.1f}" height="{bh:.1f}" '
                   f'fill="#3b6ea8"><title>{i / bins:.2f}-{(i + 1) / bins:.2f}: {c}</title></rect>')
    out.append(f'<line x1="{left}" y1="{10 + h}" x2="{left + w}" y2="{10 + h}" stroke="black"/>')
    for i in range(0, bins + 1, 5):
        out.append(f'<text x="{left + i * bar:.1f}" y="{height - bottom + 15}" text-anchor="middle">{i / bins:.2f}</text>')
    out.append(f'<text x="{left - 6}" y="16" text-anchor="end">{top}</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 4}" text-anchor="middle">similarity of A and B per sample</text>')
    return "".join(out) + "</svg>"


def html(title: str, a: str, b: str, s: dict, results: list[CaseResult], verdict: list[str]) -> str:
    rows = "".join(f"<tr><td>{escape(name)}</td><td>{_fmt(s[key])}</td></tr>" for name, key in ROWS)
    worst = "".join(
        f"<tr><td>{escape(r.case.id)}</td><td>{r.similarity:.3f}</td><td><pre>{escape(shown(r.a[0]))}</pre></td>"
        f"<td><pre>{escape(shown(r.b[0]))}</pre></td></tr>" for r in sorted(results, key=lambda r: r.similarity)[:WORST])
    sims = [v for r in results for v in r.similarities]
    verdicts = "".join(f"<li>{escape(v)}</li>" for v in verdict)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}
pre{{white-space:pre-wrap;margin:0;max-width:460px}}.pass{{color:#176b2c}}.fail{{color:#a11}}</style></head>
<body><h1>{escape(title)}</h1><p>A: {escape(a)}<br>B: {escape(b)}<br>{s['cases']} cases, {s['samples']} samples</p>
<ul>{verdicts}</ul><table><tr><th>metric</th><th>value</th></tr>{rows}</table>
<h2>Similarity distribution</h2>{histogram_svg(sims)}
<h2>Lowest similarity, side by side</h2>
<table><tr><th>case</th><th>similarity</th><th>A</th><th>B</th></tr>{worst}</table></body></html>
"""

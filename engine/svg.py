"""Small inline SVG charts for `nsd report`: bars, lines, histograms, heat maps, diagrams.

Hand-written SVG keeps the report one offline file with no plotting dependency and no
JavaScript: each chart is a few kilobytes of text that any browser draws crisply at any zoom.
Every function returns an ``<svg>`` string; every text it places is HTML-escaped here, so
callers may pass class names, model names and paths as they come from the store.
Each chart carries ``class="plot"`` and ``data-plot=KIND`` (the report's tests find them so).
"""

from __future__ import annotations

from html import escape

# Colours (Tableau 10): one meaning each across the report.
BLUE, ORANGE, RED, TEAL, GREEN, YELLOW, PURPLE, PINK, BROWN, GREY = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
SERIES = (BLUE, ORANGE, GREEN, RED, PURPLE, TEAL, BROWN, PINK, YELLOW, GREY)
INK, GRID = "#333", "#ddd"


def e(value) -> str:
    """Text as HTML/SVG content or attribute value."""
    return escape("" if value is None else str(value), quote=True)


def _open(kind: str, w: float, h: float, title: str) -> list[str]:
    return [f'<svg class="plot" data-plot="{e(kind)}" role="img" width="{w:.0f}" height="{h:.0f}" '
            f'viewBox="0 0 {w:.0f} {h:.0f}" xmlns="http://www.w3.org/2000/svg"><title>{e(title)}</title>',
            f'<rect width="{w:.0f}" height="{h:.0f}" fill="#fff"/>']


def _text(x, y, text, size=11, anchor="middle", color=INK, extra="") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{color}"{extra}>'
            f'{e(text)}</text>')


def _short(text, n: int = 14) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return f"{v:,}"


def _y_axis(parts, x0, y0, plot_h, plot_w, top, ticks=5, pct=False):
    for i in range(ticks + 1):
        v = top * i / ticks
        y = y0 - plot_h * i / ticks
        parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + plot_w}" y2="{y:.1f}" stroke="{GRID}"/>')
        label = f"{100 * v:.0f}%" if pct else (f"{v:,.0f}" if top >= ticks else f"{v:.2g}")
        parts.append(_text(x0 - 4, y + 4, label, 10, "end"))


def _nice(top: float) -> float:
    """A round axis maximum at or above TOP."""
    if top <= 0:
        return 1.0
    step = 10 ** (len(str(int(top))) - 1) if top >= 1 else 1
    for m in (1, 2, 2.5, 5, 10):
        if top <= m * step:
            return m * step
    return 10 * step


def legend(items: list[tuple[str, str]], x: float, y: float) -> list[str]:
    parts = []
    for label, color in items:
        parts.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{color}"/>')
        parts.append(_text(x + 14, y, label, 11, "start"))
        x += 24 + 6.5 * len(label)
    return parts


def stacked_bars(categories: list[str], series: list[tuple[str, str, list[float]]], title: str,
                 kind: str = "stacked-bars", hline: tuple[str, float] | None = None, width: int = 640) -> str:
    """One bar per category, stacked by series ``(name, colour, values)``; HLINE draws a level."""
    n = max(len(categories), 1)
    h, left, bottom, top_pad = 260, 56, 64, 34
    bar_w = max(4.0, min(40.0, (width - left - 10) / n * 0.7))
    step = (width - left - 10) / n
    totals = [sum(s[2][i] or 0 for s in series) for i in range(len(categories))]
    top = _nice(max(totals + [hline[1] if hline else 0, 1]))
    plot_h = h - bottom - top_pad
    y0 = h - bottom
    parts = _open(kind, width, h, title)
    _y_axis(parts, left, y0, plot_h, width - left - 10, top)
    for i, cat in enumerate(categories):
        x = left + step * i + (step - bar_w) / 2
        acc = 0.0
        for name, color, values in series:
            v = values[i] or 0
            if v <= 0:
                continue
            y = y0 - plot_h * (acc + v) / top
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{plot_h * v / top:.1f}" '
                         f'fill="{color}"><title>{e(cat)}: {e(name)} {e(_fmt(v))}</title></rect>')
            acc += v
        if n <= 40:
            parts.append(_text(x + bar_w / 2 - 4, y0 + 12, _short(cat, 12), 10, "start",
                               extra=f' transform="rotate(30 {x + bar_w / 2 - 4:.1f} {y0 + 12:.1f})"'))
    if hline:
        y = y0 - plot_h * hline[1] / top
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="{INK}" '
                     f'stroke-dasharray="5,3"/>')
        parts.append(_text(width - 12, y - 4, f"{hline[0]} = {_fmt(hline[1])}", 11, "end"))
    parts += legend([(s[0], s[1]) for s in series], left, 16)
    parts.append("</svg>")
    return "".join(parts)


def line_chart(xs: list, series: list[tuple[str, str, list[float | None], bool]], title: str,
               kind: str = "lines", pct: bool = True, width: int = 520, x_label: str = "iteration") -> str:
    """Lines over XS, one per ``(name, colour, values, dashed)``; None values are gaps."""
    h, left, bottom, top_pad = 240, 48, 40, 34
    plot_w, plot_h = width - left - 16, h - bottom - top_pad
    y0 = h - bottom
    vals = [v for s in series for v in s[2] if v is not None]
    top = 1.0 if pct else _nice(max(vals + [1]))
    parts = _open(kind, width, h, title)
    _y_axis(parts, left, y0, plot_h, plot_w, top, pct=pct)
    n = len(xs)

    def px(i):
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    for i, x in enumerate(xs):
        parts.append(_text(px(i), y0 + 14, x, 10))
    parts.append(_text(left + plot_w / 2, h - 6, x_label, 11))
    for name, color, values, dashed in series:
        pts = [(px(i), y0 - plot_h * v / top, v) for i, v in enumerate(values) if v is not None]
        dash = ' stroke-dasharray="6,4"' if dashed else ""
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for x, y, v in pts:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}">'
                         f'<title>{e(name)}: {e(f"{100 * v:.1f}%" if pct else _fmt(v))}</title></circle>')
    parts += legend([(s[0], s[1]) for s in series], left, 16)
    parts.append("</svg>")
    return "".join(parts)


def histogram(counts: list[int], title: str, threshold: float | None = None, width: int = 320,
              height: int = 150, color: str = BLUE, kind: str = "histogram") -> str:
    """Counts of equal bins over [0, 1]; THRESHOLD drawn as a red line."""
    left, bottom, top_pad = 40, 22, 20
    plot_w, plot_h = width - left - 8, height - bottom - top_pad
    y0 = height - bottom
    top = _nice(max(counts + [1]))
    parts = _open(kind, width, height, title)
    parts.append(_text(left, 13, _short(title, 44), 11, "start"))
    _y_axis(parts, left, y0, plot_h, plot_w, top, ticks=2)
    bw = plot_w / max(len(counts), 1)
    for i, c in enumerate(counts):
        if c:
            bh = plot_h * c / top
            parts.append(f'<rect x="{left + i * bw + 0.5:.1f}" y="{y0 - bh:.1f}" width="{max(bw - 1, 1):.1f}" '
                         f'height="{bh:.1f}" fill="{color}"><title>[{i / len(counts):.2f}, '
                         f'{(i + 1) / len(counts):.2f}): {c:,}</title></rect>')
    for v in (0, 0.5, 1):
        parts.append(_text(left + plot_w * v, y0 + 13, f"{v:g}", 10))
    if threshold is not None:
        x = left + plot_w * threshold
        parts.append(f'<line x1="{x:.1f}" y1="{top_pad - 4}" x2="{x:.1f}" y2="{y0}" stroke="{RED}" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def reliability(rows: list[dict], bins: int, title: str, width: int = 300) -> str:
    """Accuracy against mean confidence per confidence bin, with the diagonal of perfect calibration."""
    h = width
    left, top_pad = 40, 14
    size = width - left - 12
    y0 = top_pad + size
    parts = _open("reliability", width, h, title)
    _y_axis(parts, left, y0, size, size, 1.0, pct=True)
    parts.append(f'<line x1="{left}" y1="{y0}" x2="{left + size}" y2="{top_pad}" stroke="{GREY}" stroke-dasharray="4,3"/>')
    bw = size / bins
    for r in rows:
        x = left + r["bin"] * bw
        acc_h, conf_h = size * r["accuracy"], size * r["confidence"]
        parts.append(f'<rect x="{x + 0.5:.1f}" y="{y0 - acc_h:.1f}" width="{max(bw - 1, 1):.1f}" height="{acc_h:.1f}" '
                     f'fill="{BLUE}"><title>confidence {r["confidence"]:.2f}: accuracy {r["accuracy"]:.2f} '
                     f'({r["rows"]:,} images)</title></rect>')
        parts.append(f'<line x1="{x + 0.5:.1f}" y1="{y0 - conf_h:.1f}" x2="{x + bw - 0.5:.1f}" y2="{y0 - conf_h:.1f}" '
                     f'stroke="{RED}" stroke-width="2"/>')
    for v in (0, 0.5, 1):
        parts.append(_text(left + size * v, y0 + 13, f"{v:g}", 10))
    parts.append(_text(left + size / 2, h - 6, "confidence", 11))
    parts.append("</svg>")
    return "".join(parts)


def heatmap(labels: list[str], matrix: list[list[int]], title: str, row_title: str, col_title: str) -> str:
    """A square matrix of counts (rows: from, columns: to); the diagonal in grey, the rest in red."""
    n = len(labels)
    cell = max(14, min(36, 480 // max(n, 1)))
    left, top = 120, 90
    w, h = left + cell * n + 12, top + cell * n + 26
    off = max([matrix[i][j] for i in range(n) for j in range(n) if i != j] + [1])
    diag = max([matrix[i][i] for i in range(n)] + [1])
    parts = _open("flip-matrix", w, h, title)
    parts.append(_text(left + cell * n / 2, 14, col_title, 11))
    parts.append(_text(10, top + cell * n / 2, row_title, 11, extra=f' transform="rotate(-90 10 {top + cell * n / 2:.1f})"'))
    for j, lab in enumerate(labels):
        x = left + cell * j + cell / 2
        parts.append(_text(x, top - 6, _short(lab, 12), 10, "start", extra=f' transform="rotate(-50 {x:.1f} {top - 6})"'))
    for i, lab in enumerate(labels):
        y = top + cell * i
        parts.append(_text(left - 4, y + cell / 2 + 4, _short(lab, 16), 10, "end"))
        for j in range(n):
            v = matrix[i][j]
            if i == j:
                shade = 0.15 + 0.5 * v / diag if v else 0
                fill = f"rgba(120,120,120,{shade:.2f})"
            else:
                shade = 0.15 + 0.85 * v / off if v else 0
                fill = f"rgba(225,87,89,{shade:.2f})"
            parts.append(f'<rect x="{left + cell * j}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="{fill if v else "#f7f7f7"}"><title>{e(lab)} → {e(labels[j])}: {v:,}</title></rect>')
            if v and cell >= 22:
                parts.append(_text(left + cell * j + cell / 2, y + cell / 2 + 4, _fmt(v) if v < 10000 else "", 9))
    parts.append("</svg>")
    return "".join(parts)


def diagram(nodes: list[tuple[str, str, list[str]]], title: str) -> str:
    """A left-to-right chain of boxes ``(heading, name, detail lines)`` joined by arrows (newest
    left: each box was made from the one on its right)."""
    bw, bh, gap = 124, 82, 22
    w, h = max(len(nodes), 1) * (bw + gap) - gap + 20, bh + 20
    parts = _open("lineage", w, h, title)
    parts.append('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
                 f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{INK}"/></marker></defs>')
    colors = {"model": BLUE, "selection": GREEN, "label run": ORANGE, "labeled data": PURPLE}
    for k, (heading, name, details) in enumerate(nodes):
        x = 10 + k * (bw + gap)
        c = colors.get(heading, GREY)
        parts.append(f'<rect x="{x}" y="10" width="{bw}" height="{bh}" rx="6" fill="#fff" stroke="{c}" stroke-width="2">'
                     f'<title>{e(heading)} {e(name)}: {e(", ".join(details))}</title></rect>')
        parts.append(f'<rect x="{x}" y="10" width="{bw}" height="18" rx="6" fill="{c}"/>')
        parts.append(_text(x + bw / 2, 23, heading, 11, color="#fff"))
        parts.append(_text(x + bw / 2, 46, _short(name, 19), 11))
        for n, line in enumerate(details[:2]):
            parts.append(_text(x + bw / 2, 63 + 14 * n, _short(line, 22), 10, color="#666"))
        if k:
            parts.append(f'<line x1="{x - 2}" y1="{10 + bh / 2}" x2="{x - gap + 4}" y2="{10 + bh / 2}" '
                         f'stroke="{INK}" stroke-width="1.5" marker-end="url(#arrow)"/>')
    parts.append("</svg>")
    return "".join(parts)


def timeline(points: list[tuple[int, str, str]], title: str, width: int = 900) -> str:
    """Snapshots as dots on a line, coloured by command ``(snapshot, command, label)``."""
    h, left, right = 92, 20, 20
    commands = sorted({c for _, c, _ in points})
    color = {c: SERIES[i % len(SERIES)] for i, c in enumerate(commands)}
    lo = min((p[0] for p in points), default=0)
    hi = max((p[0] for p in points), default=1)
    span = max(hi - lo, 1)
    parts = _open("timeline", width, h, title)
    y = 54
    parts.append(f'<line x1="{left}" y1="{y}" x2="{width - right}" y2="{y}" stroke="{GRID}" stroke-width="2"/>')
    for snap, command, label in points:
        x = left + (width - left - right) * (snap - lo) / span
        parts.append(f'<circle cx="{x:.1f}" cy="{y}" r="5" fill="{color[command]}"><title>snapshot {snap}: '
                     f'{e(label)}</title></circle>')
    for v in (lo, hi):
        x = left + (width - left - right) * (v - lo) / span
        parts.append(_text(x, y + 22, f"snapshot {v}", 10))
    parts += legend([(c, color[c]) for c in commands], left, 16)
    parts.append("</svg>")
    return "".join(parts)

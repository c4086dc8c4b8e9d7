"""The comparison as one self-contained HTML page: the table, size-vs-metric and latency-vs-metric
plots (inline SVG from matplotlib) marking the Pareto front, and each artifact's per-layer breakdown.
No scripts, fonts or images are fetched, so the page opens offline."""
from __future__ import annotations

import html
import io
from typing import Any

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: 3px 9px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, td.error { text-align: left; }
td.error { color: #a00; white-space: normal; max-width: 28em; }
tr.front td:first-child { font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plots figure { margin: 0; }
details { margin: .4em 0; }
.muted { color: #666; }
"""


def render(comp: Any, title: str = "modelpress comparison") -> str:
    """The page's HTML for a `compare.Comparison` (compare imports this module, not the other way)."""
    header, cells = comp.table()
    fronts = set(comp.front("bytes")) | set(comp.front("latency_ms"))
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p class='muted'>{html.escape(comp.machine)}. Latency: median of round-by-round timings of "
            f"{html.escape(comp.latency_input)} (spread: fastest-slowest). Pareto metric: "
            f"{html.escape(str(comp.metric))} (higher is better), measured on {html.escape(comp.measured_on)}; "
            "names in bold are on a Pareto front.</p>",
            "<table id='results'><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) +
            "</tr></thead><tbody>"]
    for row, cs in zip(comp.rows, cells):
        cls = "result front" if row.name in fronts else "result"
        tds = "".join(f"<td class='error'>{html.escape(c)}</td>" if i == len(cs) - 1 else f"<td>{html.escape(c)}</td>"
                      for i, c in enumerate(cs))
        body.append(f"<tr class='{cls}' data-name='{html.escape(row.name, quote=True)}'>{tds}</tr>")
    body.append("</tbody></table>")
    if comp.metric:
        body.append("<div class='plots'>")
        for key, label, log in (("bytes", "file bytes", True), ("latency_ms", "latency ms", False)):
            body.append(f"<figure id='plot-{key}'>{_plot(comp, key, label, log)}</figure>")
        body.append("</div>")
    body.append("<h2>Per-layer breakdown</h2>")
    for row in comp.rows:
        if not row.layers:
            continue
        lines = "".join(
            f"<tr><td>{html.escape(t['name'])}</td><td>{html.escape(t['kind'])}</td>"
            f"<td>{'x'.join(map(str, t['shape']))}</td><td>{t['bytes']:,}</td><td>{100 * t['sparsity']:.1f}%</td>"
            f"<td>{t['bits']}</td><td>{t['bits_per_param']:.3f}</td></tr>" for t in row.layers)
        body.append(f"<details><summary>{html.escape(row.name)}: {len(row.layers)} tensors, {row.bytes:,} bytes"
                    f"</summary><table><tr><th>tensor</th><th>encoding</th><th>shape</th><th>bytes</th>"
                    f"<th>sparsity</th><th>bits</th><th>bits/param</th></tr>{lines}</table></details>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>" + html.escape(title) +
            f"</title><style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def _plot(comp: Any, key: str, label: str, log: bool) -> str:
    """An inline SVG scatter of `key` against the metric: one point per result (SVG group id
    `<key>-point-<i>`), the Pareto front drawn as a line."""
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot state, no backend switch

    pts = [(i, getattr(r, key), r.metrics[comp.metric], r.name) for i, r in enumerate(comp.rows)
           if r.error is None and getattr(r, key) is not None and comp.metric in r.metrics]
    front = set(comp.front(key))
    fig = Figure(figsize=(5.6, 4.0), dpi=100)
    ax = fig.subplots()
    for i, x, y, name in pts:
        on = name in front
        ax.scatter([x], [y], s=46 if on else 30, color="#c0392b" if on else "#2c7fb8", zorder=3,
                   gid=f"{key}-point-{i}")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    line = sorted((x, y) for _, x, y, name in pts if name in front)
    if len(line) > 1:
        ax.plot(*zip(*line), color="#c0392b", lw=1, ls="--", zorder=2, label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    if log and pts:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)  # room for the names beside the outermost points
    ax.set_xlabel(label + " (lower is better)")
    ax.set_ylabel(str(comp.metric))
    ax.grid(alpha=.3)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype: the SVG sits inside HTML

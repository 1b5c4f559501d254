"""An explorer page for an audit or a scores table: one self-contained HTML file that opens
offline (plotly.js is embedded).

* a scatter (the data map, confidence against variability, or any two score columns):
  hovering a point draws the example beside it (an image for 2-D examples such as digits,
  a line for 1-D signals such as MNIST-1D, the text for text) with its labels and scores;
* clicking a point (or box/lasso-selecting several) filters the table below to them;
* the table lists every example with given and suggested label, every score and flag;
  a click on a column header sorts by it; checkboxes keep only the flagged examples of an
  issue type.

    from gradsift.explorer import write_explorer
    write_explorer(table, "explorer.html", inputs=train.x, shape=(8, 8))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["write_explorer"]

_FLAGS = ("is_label", "is_outlier", "is_near_duplicate")

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; }}
#top {{ display: flex; gap: 16px; }}
#plot {{ width: 760px; height: 520px; }}
#example {{ width: 300px; border: 1px solid #ccc; padding: 8px; min-height: 200px; }}
table {{ border-collapse: collapse; font-size: 12px; margin-top: 12px; }}
th, td {{ border: 1px solid #ddd; padding: 2px 6px; text-align: right; }}
th {{ cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }}
tr.flag td {{ background: #fff1f0; }}
#controls label {{ margin-right: 12px; }}
</style></head><body>
<h1>{title}</h1>
<div id="top"><div id="plot"></div><div id="example"><em>hover a point to see the example</em></div></div>
<div id="controls">{checkboxes} <button id="reset">show all</button> <span id="count"></span></div>
<table id="examples"><thead><tr id="head"></tr></thead><tbody id="body"></tbody></table>
<script>{plotly}</script>
<script>
const DATA = {data};
const COLS = DATA.columns, ROWS = DATA.rows, SHAPE = DATA.shape, INPUTS = DATA.inputs;
let shown = ROWS.map((_, i) => i), sortCol = null, sortDir = 1;
const fmt = v => (typeof v === "number" && !Number.isInteger(v)) ? v.toFixed(3) : String(v);
function drawExample(i) {{
  const box = document.getElementById("example");
  const r = ROWS[i];
  let html = "<b>example " + r[0] + "</b><br>";
  const x = INPUTS ? INPUTS[i] : null;
  if (x && typeof x === "string") {{
    html += "<p>" + x.replace(/</g, "&lt;") + "</p>";
  }} else if (x && SHAPE.length === 2) {{
    const [h, w] = SHAPE, s = 12, lo = Math.min(...x), hi = Math.max(...x) || 1;
    html += '<svg id="example-drawing" width="' + w * s + '" height="' + h * s + '">';
    for (let a = 0; a < h; a++) for (let b = 0; b < w; b++) {{
      const g = Math.round(255 * (1 - (x[a * w + b] - lo) / ((hi - lo) || 1)));
      html += '<rect x="' + b * s + '" y="' + a * s + '" width="' + s + '" height="' + s + '" fill="rgb(' + g + ',' + g + ',' + g + ')"/>';
    }}
    html += "</svg>";
  }} else if (x) {{
    const lo = Math.min(...x), hi = Math.max(...x), W = 280, H = 120;
    const pts = x.map((v, k) => (k * W / (x.length - 1)).toFixed(1) + "," + (H - (v - lo) / ((hi - lo) || 1) * H).toFixed(1));
    html += '<svg id="example-drawing" width="' + W + '" height="' + H + '"><polyline fill="none" stroke="#1f77b4" points="' + pts.join(" ") + '"/></svg>';
  }}
  html += "<table>" + COLS.slice(1).map((c, k) => "<tr><td>" + c + "</td><td>" + fmt(r[k + 1]) + "</td></tr>").join("") + "</table>";
  box.innerHTML = html;
}}
function render() {{
  const head = document.getElementById("head");
  head.innerHTML = COLS.map((c, k) => '<th data-col="' + k + '">' + c + (sortCol === k ? (sortDir > 0 ? " ▲" : " ▼") : "") + "</th>").join("");
  const flagIdx = DATA.flags.map(f => COLS.indexOf(f));
  const body = document.getElementById("body");
  body.innerHTML = shown.slice(0, 500).map(i => {{
    const r = ROWS[i], flagged = flagIdx.some(k => k >= 0 && r[k] === true);
    return '<tr data-row="' + i + '"' + (flagged ? ' class="flag"' : "") + ">" + r.map(v => "<td>" + fmt(v) + "</td>").join("") + "</tr>";
  }}).join("");
  document.getElementById("count").textContent = shown.length + " of " + ROWS.length + " examples" + (shown.length > 500 ? " (first 500 listed)" : "");
}}
function applyFilters(subset) {{
  const want = [...document.querySelectorAll("input.flag:checked")].map(e => COLS.indexOf(e.value));
  let base = subset || ROWS.map((_, i) => i);
  if (want.length) base = base.filter(i => want.some(k => ROWS[i][k] === true));
  shown = base;
  if (sortCol !== null) sortRows();
  render();
}}
function sortRows() {{
  shown.sort((a, b) => {{
    const x = ROWS[a][sortCol], y = ROWS[b][sortCol];
    return (x < y ? -1 : x > y ? 1 : 0) * sortDir;
  }});
}}
document.getElementById("head").addEventListener("click", e => {{
  const th = e.target.closest("th"); if (!th) return;
  const k = Number(th.dataset.col);
  sortDir = (sortCol === k) ? -sortDir : -1; sortCol = k;
  sortRows(); render();
}});
document.querySelectorAll("input.flag").forEach(e => e.addEventListener("change", () => applyFilters()));
document.getElementById("reset").addEventListener("click", () => {{
  document.querySelectorAll("input.flag").forEach(e => e.checked = false); applyFilters();
}});
const fig = DATA.figure;
Plotly.newPlot("plot", fig.data, fig.layout, {{displaylogo: false, responsive: true}}).then(gd => {{
  gd.on("plotly_hover", ev => drawExample(ev.points[0].customdata));
  gd.on("plotly_click", ev => applyFilters(ev.points.map(p => p.customdata)));
  gd.on("plotly_selected", ev => {{ if (ev && ev.points.length) applyFilters(ev.points.map(p => p.customdata)); }});
  window.explorerReady = true;
}});
render();
</script></body></html>
"""


def _jsonable(v):
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else round(float(v), 5)
    return v


def write_explorer(table: pd.DataFrame, path: str | Path, *, inputs: np.ndarray | Sequence[str] | None = None,
                   shape: Sequence[int] | None = None, x: str | None = None, y: str | None = None,
                   title: str = "gradsift explorer") -> Path:
    """Write the explorer page of ``table`` (indexed by ``example_id``; an :func:`gradsift.audit`
    table or ``scores.parquet``).

    Args:
        table: one row per example.
        inputs: ``[N, ...]`` the examples in the table's row order (drawn on hover:
            ``shape`` of 2 dimensions draws an image, otherwise a line), or ``N`` strings.
        shape: the shape of one example for drawing (e.g. ``(8, 8)``).
        x, y: the scatter's columns (default: ``variability`` and ``confidence`` when the
            table has them, else its first two numeric columns).
        title: the page title.

    Returns:
        The path written (one file, no network needed to view it).
    """
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    path = Path(path)
    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c]) and table[c].dtype != bool]
    if x is None or y is None:
        if {"variability", "confidence"} <= set(table.columns):
            x, y = "variability", "confidence"
        elif len(numeric) >= 2:
            x, y = numeric[0], numeric[1]
        else:
            raise ValueError("the table needs two numeric columns for the scatter")
    flags = [f for f in _FLAGS if f in table.columns]
    flagged = table[flags].any(axis=1).to_numpy() if flags else np.zeros(len(table), bool)
    pos = np.arange(len(table))
    fig = go.Figure()
    for name, sel, color in (("examples", ~flagged, "#1f77b4"), ("flagged", flagged, "#d62728")):
        if sel.any():
            fig.add_trace(go.Scatter(x=table[x].to_numpy()[sel], y=table[y].to_numpy()[sel], mode="markers",
                                       name=name, customdata=pos[sel], marker=dict(size=6, color=color, opacity=0.7),
                                       hovertemplate=f"example %{{customdata}}<br>{x} %{{x:.3f}}<br>{y} %{{y:.3f}}"
                                                     "<extra></extra>"))
    fig.update_layout(xaxis_title=x, yaxis_title=y, margin=dict(l=50, r=10, t=30, b=50), dragmode="select",
                      legend=dict(orientation="h"))
    frame = table.reset_index()
    rows = [[_jsonable(v) for v in r] for r in frame.itertuples(index=False, name=None)]
    data_inputs = None
    if inputs is not None:
        data_inputs = [str(v) for v in inputs] if isinstance(inputs[0], str) else \
            np.round(np.asarray(inputs, dtype=np.float64).reshape(len(table), -1), 4).tolist()
    payload = {"columns": [str(c) for c in frame.columns], "rows": rows, "flags": flags,
               "shape": list(shape) if shape else [], "inputs": data_inputs,
               "figure": json.loads(fig.to_json())}
    checkboxes = " ".join(f'<label><input type="checkbox" class="flag" value="{f}"> {f[3:].replace("_", " ")}</label>'
                          for f in flags)
    html = _PAGE.format(title=title, checkboxes=checkboxes, plotly=get_plotlyjs(),
                        data=json.dumps(payload).replace("</", "<\\/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path

"""HTML building blocks of the report: escaping, figures as data URIs, tables, the page.

Everything is inline (CSS in a ``<style>`` element, images as base64 PNG data URIs), so
the page needs no network and refers to no external URL. Every plot is a
``<figure class="plot" id="plot-..." data-plot="...">`` holding one ``<img>``; sections
are ``<section id="section-..." data-section="...">``: tests and users find them by
those stable ids.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..errors import GradsiftError

CSS = """
:root { --fg: #1d232a; --muted: #5b6570; --line: #d9dee3; --accent: #2f6db5; --bg: #fbfcfd; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: var(--muted); }
nav { padding: 8px 32px; background: #fff; border-bottom: 1px solid var(--line); }
nav a { color: var(--accent); margin-right: 16px; text-decoration: none; }
main { padding: 8px 32px 48px; max-width: 1400px; }
section { margin-top: 24px; }
h2 { font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.note { color: var(--muted); margin: 4px 0 10px; }
.headline { font-size: 16px; font-weight: 600; margin: 6px 0; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
figure.plot { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
figure.plot img { display: block; max-width: 100%; height: auto; }
figure.plot figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; max-width: 520px; }
table { border-collapse: collapse; background: #fff; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f1f4f7; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 8px; width: 190px; }
.card figure.plot { border: 0; padding: 0; }
.card dl { display: grid; grid-template-columns: auto 1fr; gap: 0 8px; margin: 6px 0 0; font-size: 12px; }
.card dt { color: var(--muted); }
.card dd { margin: 0; }
details { margin: 10px 0; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; }
details > summary { cursor: pointer; font-weight: 600; }
.columns { display: flex; flex-wrap: wrap; gap: 0 32px; align-items: flex-start; }
"""


class ReportError(GradsiftError, ValueError):
    """The path given is not a run or experiment directory, or what it holds is unreadable."""


def esc(value: Any) -> str:
    """HTML-escape ``str(value)``."""
    return html.escape(str(value), quote=True)


def slug(text: str) -> str:
    """A stable id fragment: lower case, runs of other characters replaced by ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def png_data_uri(fig, *, dpi: int = 90) -> str:
    """Render a matplotlib figure to a ``data:image/png;base64,...`` URI and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure(fig, plot_id: str, caption: str = "", *, alt: str | None = None, dpi: int = 90) -> str:
    """A ``<figure class="plot" id="plot-<plot_id>" data-plot="<plot_id>">`` with ``fig`` as PNG."""
    pid = slug(plot_id)
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return (
        f'<figure class="plot" id="plot-{pid}" data-plot="{pid}">'
        f'<img alt="{esc(alt or caption or plot_id)}" src="{png_data_uri(fig, dpi=dpi)}">{cap}</figure>'
    )


def fmt(value: Any) -> str:
    """Numbers with 4 significant digits, booleans and everything else as text."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return esc(", ".join(str(v) for v in value))
    if isinstance(value, dict):
        return esc(", ".join(f"{k}={v}" for k, v in value.items()))
    return esc(value)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def kv_table(items: Mapping[str, Any], table_id: str | None = None) -> str:
    """A two-column table of ``key | value``."""
    tid = f' id="{esc(table_id)}"' if table_id else ""
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td{' class=num' if _is_num(v) else ''}>{fmt(v)}</td></tr>"
        for k, v in items.items()
    )
    return f"<table{tid}>{rows}</table>"


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str | None = None) -> str:
    """A table with a header row."""
    tid = f' id="{esc(table_id)}"' if table_id else ""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if _is_num(v) else ''}>{fmt(v)}</td>" for v in row) + "</tr>"
        for row in rows
    )
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Section:
    """One titled part of the report; ``body`` is HTML."""

    key: str
    title: str
    body: str
    children: list["Section"] = field(default_factory=list)

    def render(self, level: int = 2) -> str:
        inner = self.body + "".join(c.render(level + 1) for c in self.children)
        sid = slug(self.key)
        return (
            f'<section id="section-{sid}" data-section="{sid}">'
            f"<h{level}>{esc(self.title)}</h{level}>{inner}</section>"
        )


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole self-contained HTML document."""
    nav = "".join(f'<a href="#section-{slug(s.key)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(s.render() for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )

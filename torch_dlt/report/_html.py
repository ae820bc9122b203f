"""A self-contained HTML page from report sections: inline CSS, figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from typing import Sequence

_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
.flag { color: #b00020; font-weight: 600; } .ok { color: #1b7a1b; font-weight: 600; }
.summary li { margin: 0.15em 0; } figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; } .note { color: #555; font-size: 0.9em; }
.error { background: #fff3f3; border: 1px solid #e0b4b4; padding: 0.6em; }
"""


@dataclass
class Figure:
    """A PNG image with its caption."""

    png: bytes
    caption: str = ""


@dataclass
class Table:
    """A table; cells are formatted with ``str`` (floats with 4 significant digits)."""

    header: Sequence[str]
    rows: Sequence[Sequence[object]]
    flagged_rows: Sequence[int] = ()


@dataclass
class Section:
    """One part of the report: a title, summary lines (also printed), tables, figures, notes."""

    title: str
    summary: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def figure_png(fig, *, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _cell(value: object) -> tuple[str, str]:
    if isinstance(value, float):
        text = f"{value:.4g}"
        return text, ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), ""
    return html.escape(str(value)), ' class="text"'


def _table(table: Table) -> str:
    head = "".join(f"<th{_cell(h)[1]}>{html.escape(str(h))}</th>" for h in table.header)
    body = []
    for i, row in enumerate(table.rows):
        cells = "".join(f"<td{cls}>{text}</td>" for text, cls in map(_cell, row))
        style = ' class="flag"' if i in table.flagged_rows else ""
        body.append(f"<tr{style}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _section(section: Section) -> str:
    parts = [f"<section><h2>{html.escape(section.title)}</h2>"]
    if section.error:
        parts.append(f'<p class="error">This section failed: {html.escape(section.error)}</p>')
    if section.summary:
        items = "".join(f"<li>{html.escape(s)}</li>" for s in section.summary)
        parts.append(f'<ul class="summary">{items}</ul>')
    parts.extend(_table(t) for t in section.tables)
    for fig in section.figures:
        data = base64.b64encode(fig.png).decode("ascii")
        parts.append(
            f'<figure><img alt="{html.escape(fig.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>"
        )
    parts.extend(f'<p class="note">{html.escape(n)}</p>' for n in section.notes)
    parts.append("</section>")
    return "\n".join(parts)


def render(title: str, meta: Sequence[str], sections: Sequence[Section]) -> str:
    """The whole page as one string; it loads nothing from outside."""
    meta_html = "<br>".join(html.escape(m) for m in meta)
    body = "\n".join(_section(s) for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="meta">{meta_html}</p>\n{body}\n</body></html>\n'
    )

"""Results in a notebook: an HTML table with the headline, for Jupyter's ``_repr_html_``.

Generic over the result dataclasses: the headline (``headline``, ``verdict`` or ``verdict.summary``), then one table
of the scalar fields (one level of nested dataclasses flattened: ``model.name``), then the first list of records
(``layers``, ``rows``, ``cells`` ...) as its own table of their scalar columns. Every value is escaped.
"""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Any

MAX_ROWS = 40
MAX_COLUMNS = 12


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)) and all(_scalar(v) for v in value) and len(value) <= 6:
        return ", ".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def headline_of(result: Any) -> str:
    for name in ("headline", "verdict", "summary"):
        value = getattr(result, name, None)
        if isinstance(value, str) and value:
            return value
        if dataclasses.is_dataclass(value) and isinstance(getattr(value, "summary", None), str):
            return value.summary
    return ""


def _fields(obj: Any) -> list[tuple[str, Any]]:
    return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]


def result_html(result: Any) -> str:
    """The HTML for ``result._repr_html_()``."""
    esc = html.escape
    rows: list[tuple[str, str]] = []
    records: tuple[str, list[Any]] | None = None
    for name, value in _fields(result):
        if name in ("headline",):
            continue
        if dataclasses.is_dataclass(value):
            rows += [(f"{name}.{k}", _fmt(v)) for k, v in _fields(value) if _scalar(v) or isinstance(v, list)
                     and all(_scalar(x) for x in v) and len(v) <= 6]
        elif _scalar(value) or (isinstance(value, list) and value and all(_scalar(v) for v in value)
                                and len(value) <= 6):
            rows.append((name, _fmt(value)))
        elif records is None and isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            records = (name, value)
    parts = [f"<div class='artifactscan-result'><p><b>{esc(type(result).__name__)}</b>"]
    headline = headline_of(result)
    if headline:
        parts.append(f": {esc(headline)}")
    parts.append("</p><table><tbody>")
    parts += [f"<tr><th style='text-align:left'>{esc(k)}</th><td style='text-align:left'>{esc(v)}</td></tr>"
              for k, v in rows]
    parts.append("</tbody></table>")
    if records is not None:
        name, items = records
        columns = [k for k, v in _fields(items[0]) if _scalar(v)][:MAX_COLUMNS]
        parts.append(f"<p><b>{esc(name)}</b> ({len(items)})</p><table><thead><tr>")
        parts += [f"<th>{esc(c)}</th>" for c in columns]
        parts.append("</tr></thead><tbody>")
        for item in items[:MAX_ROWS]:
            parts.append("<tr>" + "".join(f"<td>{esc(_fmt(getattr(item, c)))}</td>" for c in columns) + "</tr>")
        parts.append("</tbody></table>")
        if len(items) > MAX_ROWS:
            parts.append(f"<p>... {len(items) - MAX_ROWS} more (see to_dict())</p>")
    parts.append("</div>")
    return "".join(parts)

"""The pieces every HTML report is made of: escaped text, relative links, tables with a highlighted row,
number cells coloured from red (0) to green (1), one style sheet, and the atomic write of a page."""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import quote

from libs.errors import DISK_FULL
from libs.files import atomic_path
from libs.outputs import OutputPathError

STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right;vertical-align:top}th{background:#eee}
th{text-align:left}td.text,th.text{text-align:left}a{white-space:nowrap}tr.chosen td,tr.chosen th{background:#ffe9a8;font-weight:bold}
.note{color:#555}.warn{color:#b40}ul.warn li{margin:.2em 0}img.plot{max-width:100%}
.thumbs figure{display:inline-block;margin:4px;font-size:.8em;text-align:center;vertical-align:top}
.thumbs img{height:160px;display:block}table.images td{padding:2px}table.images img{width:128px;height:128px;display:block}
table.images th.prompt{font-weight:normal;font-size:.8em;max-width:128px;text-align:center}
.refs img{height:128px;margin:2px;border:3px solid #6c6}.refs img.noface{border-color:#d44}
.prompt{margin:1em 0;padding:.5em;border-top:1px solid #ccc}
.gen{display:inline-block;margin:4px;vertical-align:top;font-size:.85em}
.gen img{width:192px;height:192px;object-fit:cover;display:block}.missing{width:192px;height:192px;background:#fdd;
display:flex;align-items:center;justify-content:center}"""


def esc(value: Any) -> str:
    """Text (or any value) as HTML text, quotes included, so it is safe inside attributes too."""
    return html.escape(str(value), quote=True)


def rel_link(path: str | Path, base: str | Path) -> str:
    """A URL-quoted link to `path` relative to the folder `base` (where the page lives): the pair can move together."""
    return quote(Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix())


def img(path: str | Path, base: str | Path, alt: str, css: str = "") -> str:
    """An <img> of a file, linked relatively to `base`."""
    klass = f" class='{esc(css)}'" if css else ""
    return f"<img{klass} src='{rel_link(path, base)}' alt='{esc(alt)}' title='{esc(alt)}'>"


def link(path: str | Path, base: str | Path, text: str) -> str:
    """An <a> to a file, linked relatively to `base`."""
    return f"<a href='{rel_link(path, base)}'>{esc(text)}</a>"


def number(value: Any, digits: int = 3) -> str:
    """A number as the reports print it ('' for a missing one); integers with thousands separators."""
    if value is None or value == "":
        return ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def score_cell(value: float | None, digits: int = 3) -> str:
    """A 0..1 score as a cell shaded red (0) to green (1); an empty cell when there is no score."""
    if value is None:
        return "<td></td>"
    hue = int(120 * min(1.0, max(0.0, float(value))))
    return f"<td style='background:hsl({hue},70%,85%)'>{float(value):.{digits}f}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], highlight: Iterable[bool] | None = None,
          css: str = "", row_ids: Sequence[str] | None = None) -> str:
    """A table of already-rendered cells (`<td>`/`<th>` strings); the rows flagged in `highlight` carry
    class 'chosen' (how the chosen step or the winning recipe is marked)."""
    rows = list(rows)
    flags = list(highlight) if highlight is not None else [False] * len(rows)
    klass = f" class='{esc(css)}'" if css else ""
    out = [f"<table{klass}><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>"]
    for i, (cells, flag) in enumerate(zip(rows, flags)):
        attrs = " class='chosen'" if flag else ""
        if row_ids is not None:
            attrs += f" id='{esc(row_ids[i])}'"
        out.append(f"<tr{attrs}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def td(value: Any, digits: int = 3, text: bool = False) -> str:
    """A cell: a number right-aligned (`number`), or with `text` escaped text left-aligned."""
    return f"<td class='text'>{esc(value)}</td>" if text else f"<td>{number(value, digits)}</td>"


def page(title: str, body: Iterable[str]) -> str:
    """A whole page: inline style only, nothing fetched from anywhere."""
    return "\n".join([f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
                      "<link rel='icon' href='data:,'>", f"<style>{STYLE}</style></head><body>", *body,
                      "</body></html>"])


def write_page(text: str, path: str | Path) -> Path:
    """Write a page atomically (a reader never sees half a page, even while a run refreshes it)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as error:
        if error.errno in DISK_FULL:
            raise
        raise OutputPathError(f"cannot write the report {path} ({error.strerror or error}): move away what is in "
                              "its place and make its folder writable, then run the same command again") from error
    return path

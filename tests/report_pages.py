"""Reading the HTML reports back in tests: their links, and a table's rows as text with the highlighted ones."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

from bs4 import BeautifulSoup


def soup(page: Path) -> BeautifulSoup:
    return BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")


def linked_files(page: Path) -> list[Path]:
    """Every file (resolved) an <img src> or <a href> of `page` points to (anchors within the page left out)."""
    document = soup(page)
    targets = [tag["src"] for tag in document.find_all("img")] + [tag["href"] for tag in document.find_all("a")]
    return [(page.parent / unquote(target)).resolve() for target in targets if not target.startswith("#")]


def table_rows(page: Path, css: str) -> list[tuple[list[str], bool]]:
    """(cell texts, highlighted) per body row of the table with class `css`."""
    table = soup(page).find("table", class_=css)
    assert table is not None, f"no table.{css} in {page}"
    rows = table.find_all("tr")[1:]
    return [([cell.get_text(" ", strip=True) for cell in row.find_all(["th", "td"])], "chosen" in (row.get("class") or []))
            for row in rows]

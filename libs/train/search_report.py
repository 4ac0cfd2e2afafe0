"""`<out>/auto_recipe/report.html`: what an --auto_recipe search tried and which recipe won, and why.

The rows are libs/train/auto_recipe.py's `table_rows` (the ones written to table.csv); each recipe's
own run report (libs/train/run_report.py) is linked from its row, and the frontier plot that
libs/train/frontier.py drew (best objective against changed parameters, Pareto-optimal recipes, winner) is shown.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from libs.report.html import esc, img, link, page, score_cell, table, td, write_page
from libs.train.selection import METRICS
from libs.train_output import FRONTIER_FILE, META_FILE, REPORT_FILE


def write_search_report(work: str | Path, rows: Sequence[Mapping[str, Any]], recipes: Mapping[str, str],
                        penalty: float) -> Path:
    """Write `<work>/report.html` (showing libs/train/frontier.py's `frontier.png`) for the search whose folder is `work`; returns the page."""
    work = Path(work)
    finished = [row for row in rows if row.get("score") is not None]
    winner = next((row for row in rows if row.get("winner")), None)
    body = [f"<h1>Recipe search: {esc(work.parent.name)}</h1>"]
    if winner is not None:
        body.append(f"<p>Winner: <b>{esc(winner['recipe'])}</b> (step {winner['best_step']}), the highest score = "
                    f"best objective &minus; {penalty:g} &times; changed parameters / 1e6. Its adapters are in "
                    f"{link(work.parent / META_FILE, work, work.parent.name + '/')}.</p>")
    else:
        body.append("<p>No recipe finished yet.</p>")
    body += _table(work, rows, recipes)
    if finished and (work / FRONTIER_FILE).is_file():  # drawn by libs/train/frontier.py before this page
        body += ["<h2>Frontier</h2><p class='note'>each trained recipe's best objective against its changed "
                 "parameters (log scale); joined: the Pareto-optimal recipes; the star: the winner</p>",
                 img(work / FRONTIER_FILE, work, "objective against changed parameters", "plot")]
    return write_page(page(f"recipe search {work.parent.name}", body), work / REPORT_FILE)


def _table(work: Path, rows: Sequence[Mapping[str, Any]], recipes: Mapping[str, str]) -> list[str]:
    cells = []
    for row in rows:
        report = work / row["recipe"] / REPORT_FILE
        changes = json.loads(row["changes"])  # table.csv's JSON text
        cells.append([
            f"<th class='text' title='{esc(recipes.get(row['recipe'], ''))}'>{esc(row['recipe'])}</th>",
            td(", ".join(f"{k}={v}" for k, v in changes.items()) or "(base)", text=True),
            td(row["status"], text=True), td(row.get("train_step")), td(row.get("best_step")),
            *(score_cell(row.get(metric)) for metric in METRICS), td(row.get("objective"), 4),
            td(row.get("changed_parameters")), td(row.get("penalty"), 6), td(row.get("score"), 4),
            f"<td>{link(report, work, 'run report')}</td>" if report.is_file() else "<td></td>",
        ])
    headers = ["recipe", "settings that differ from base", "status", "steps", "best step", *METRICS, "objective",
               "changed parameters", "penalty", "score", "report"]
    described = "".join(f"<li><b>{esc(name)}</b>: {esc(what)}</li>" for name, what in recipes.items())
    return ["<h2>Recipes</h2>", table(headers, cells, [bool(row.get("winner")) for row in rows], css="recipes",
                                      row_ids=[f"recipe-{row['recipe']}" for row in rows]),
            f"<ul class='note'>{described}</ul>"]

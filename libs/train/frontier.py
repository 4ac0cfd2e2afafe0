"""The score-versus-parameters frontier of an `--auto_recipe` search (auto_recipe/frontier.png).

The competition ranks identity and the changed-parameter count (spec §7), so a recipe is worth keeping
only when no other recipe reaches at least its objective with at most its parameters: those are the
Pareto-optimal recipes, marked on the plot; the winner (objective minus the parameter penalty) is
highlighted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from libs.files import atomic_path


def pareto_optimal(rows: Sequence[dict[str, Any]]) -> list[bool]:
    """Per row: True when it is scored and no other scored row has <= its changed parameters and >= its
    objective with one of the two strictly better."""
    scored = [(row["changed_parameters"], row["objective"]) if row.get("score") is not None else None for row in rows]
    flags = []
    for point in scored:
        if point is None:
            flags.append(False)
            continue
        params, objective = point
        flags.append(not any(other is not None and other[0] <= params and other[1] >= objective and other != point
                             for other in scored))
    return flags


def plot_frontier(rows: Sequence[dict[str, Any]], path: Path, objective: str) -> None:
    """Best-step objective against changed parameters (log scale) for the scored recipes, the frontier
    joined and marked, the winner highlighted; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    optimal = pareto_optimal(rows)
    scored = [(row, best) for row, best in zip(rows, optimal) if row.get("score") is not None]
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    for row, best in scored:
        axes.scatter(row["changed_parameters"], row["objective"], s=90 if row["winner"] else 40,
                     c="tab:red" if row["winner"] else "tab:blue" if best else "tab:gray",
                     marker="*" if row["winner"] else "o", zorder=3)
        axes.annotate(row["recipe"], (row["changed_parameters"], row["objective"]), textcoords="offset points",
                      xytext=(5, 5), fontsize=8)
    front = sorted((row["changed_parameters"], row["objective"]) for row, best in scored if best)
    if front:
        axes.plot(*zip(*front), color="tab:blue", linewidth=1, zorder=2, label="Pareto-optimal recipes")
    winner = next((row["recipe"] for row, _ in scored if row["winner"]), None)
    axes.set_xscale("log")
    axes.set_xlabel("changed parameters (spec §7)")
    axes.set_ylabel("best-step objective")
    axes.ticklabel_format(axis="y", useOffset=False)
    axes.set_title(f"winner: {winner}\nobjective = {objective}", fontsize=9, wrap=True)
    axes.grid(True, which="both", alpha=0.3)
    if front:
        axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)

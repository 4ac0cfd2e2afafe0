"""The validation curves of a run as one PNG: face, CLIP-I, CLIP-T, the selection objective and the losses
against the step, drawn from the run's JSONL log (so a resumed run's plot is the uninterrupted one's),
with the chosen step marked. matplotlib (Agg, no display) is imported only when a plot is drawn."""
from __future__ import annotations

import textwrap
from pathlib import Path

from libs.files import atomic_path
from libs.train.logs import log_lines

PANELS = (
    ("face (insightface or dlib cosine)", ("sim_face", "edit_face")),
    ("CLIP image similarity to the photos", ("sim_clip_img", "edit_clip_img")),
    ("CLIP text alignment (edit prompts)", ("edit_clip_text",)),
    ("selection objective", ("objective",)),
    ("loss", ("loss", "eval_loss_instance")),
)


def read_series(log_path: Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} of every numeric key the plot draws, in log order."""
    series: dict[str, list[tuple[int, float]]] = {key: [] for _, keys in PANELS for key in keys}
    for _, record in log_lines(log_path):
        for key in series:
            if isinstance(record.get(key), (int, float)):
                series[key].append((int(record["step"]), float(record[key])))
    return series


def plot_curves(log_path: Path, path: Path, chosen_step: int | None = None, objective: str | None = None) -> Path:
    """Draw the curves of `log_path` into the PNG `path` (written atomically); `objective` titles its panel."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = read_series(log_path)
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    for axis, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            if series[key]:
                steps, values = zip(*series[key])
                axis.plot(steps, values, marker="o" if key != "loss" else None, markersize=3, label=key,
                          linewidth=1 if key == "loss" else 1.5)
        if chosen_step is not None:
            axis.axvline(chosen_step, color="grey", linestyle="--", linewidth=1, label=f"chosen: step {chosen_step}")
        heading = f"{title}: {objective}" if "objective" in keys and objective else title
        axis.set_title(textwrap.fill(heading, 60), fontsize=10)  # a long objective wraps instead of being cut
        axis.ticklabel_format(axis="y", useOffset=False)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    axes.flat[-1].axis("off")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
    return path

"""The HTML reports without a browser, on a tiny training run built once for the module: the run report's
selection table is the log's validations and personalization.json's selection (chosen row highlighted), it is
watchable during the run, a resumed run's report covers the run once, every link resolves (also in a moved
copy of the folder), the search report is table.csv with the winner highlighted, and the score report links
each subject's training with the numbers validation predicted."""
from __future__ import annotations

import csv
import json
import shutil
from copy import deepcopy
from pathlib import Path

import pytest
from PIL import Image

from conftest import stop_at, tiny_world_config
from libs.report.html import esc, rel_link, table
from libs.layout import ADVANCED
from libs.report.trained import find_training
from libs.score.report import REPORT_HTML, write_reports
from libs.score.results import ImageScore, PromptScore, ScoreResult, TaskResult
from libs.train import METRICS, Rendered, ValidationScores, run_auto_recipe, train
from libs.train.logs import read_log
from libs.train_output import AUTO_DIR, META_FILE, REPORT_FILE, TABLE_FILE
from report_pages import linked_files, soup, table_rows

SIM_FACE = {1: 0.20, 2: 0.80, 3: 0.30, 4: 0.50}  # step 2 has the highest objective


def step_scores(step: int, sim_face: float) -> dict[str, float]:
    """Five distinct numbers per step (so a swapped column would show)."""
    return {"sim_face": sim_face, "sim_clip_img": 0.61 + step / 100, "edit_face": 0.011 * step,
            "edit_clip_img": 0.52 - step / 50, "edit_clip_text": 0.023 * step}


class StepScores:
    """An injected scorer: sim_face from a known curve per (run folder name, step), the other four from the step."""

    def __init__(self, curves: dict[str, dict[int, float]]):
        self.curves = curves

    def __call__(self, rendered: Rendered) -> ValidationScores:
        run = rendered.folder.parent.parent.name  # <run>/validation/step-N
        return ValidationScores(step_scores(rendered.step, self.curves[run][rendered.step]), "test", True)


def run_config(tiny_world: Path, **settings):
    config = deepcopy(tiny_world_config(tiny_world))
    config.train.update({"with_prior_preservation": False, "train_step": 4, "validation_steps": 1,
                         "checkpointing_steps": 2, **settings})
    return config


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory, public_photos) -> Path:
    folder = tmp_path_factory.mktemp("data") / "train_data" / "boy1"
    folder.mkdir(parents=True)
    public_photos["astronaut"].save(folder / "astronaut.jpg", quality=95)
    public_photos["grace_hopper"].save(folder / "grace_hopper.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def trained(tiny_world: Path, subject: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """model_output/boy1 trained 4 steps, validated at each; the report as it was after step 3's validation."""
    out = tmp_path_factory.mktemp("run") / "model_output" / "boy1"
    during: dict[int, str] = {}

    def snapshot(step: int, logs: dict) -> None:
        during[step] = (out / REPORT_FILE).read_text(encoding="utf-8")

    train(run_config(tiny_world), subject, out, score_fn=StepScores({"boy1": SIM_FACE}), on_step=snapshot)
    return {"out": out, "during": during}


def selection_table(page: Path) -> tuple[list[list[str]], list[int]]:
    rows = table_rows(page, "selection")
    return [cells for cells, _ in rows], [int(cells[0]) for cells, chosen in rows if chosen]


# --- the run report --------------------------------------------------------------------------------


def test_run_report_table_is_the_log_and_the_selection(trained):
    out = trained["out"]
    cells, chosen = selection_table(out / REPORT_FILE)
    validations = [line for line in read_log(out) if "objective" in line]
    selection = json.loads((out / META_FILE).read_text())["selection"]
    assert [int(row[0]) for row in cells] == [line["step"] for line in validations] == [1, 2, 3, 4]
    for row, line in zip(cells, validations):
        scores = selection["scores"][str(line["step"])]
        assert [float(v) for v in row[1:6]] == [round(line[m], 3) for m in METRICS] == [round(scores[m], 3) for m in METRICS]
        assert float(row[6]) == round(line["objective"], 4) == round(scores["objective"], 4)
    assert chosen == [selection["chosen_step"]] == [2]
    page = soup(out / REPORT_FILE)
    assert "the highest objective of 4 validated steps" in page.get_text()
    image_rows = page.find("table", class_="images").find_all("tr", class_="chosen")
    assert len(image_rows) == 1 and image_rows[0].th.get_text() == "2"  # the image grid marks the same step


def test_run_report_is_refreshed_at_each_validation(trained):
    """After step 3's validation the page showed steps 1-3 with the best so far (2) marked, the run in progress."""
    during = trained["out"].parent / "during.html"
    during.write_text(trained["during"][3], encoding="utf-8")
    cells, chosen = selection_table(during)
    assert [int(row[0]) for row in cells] == [1, 2, 3] and chosen == [2]
    assert "in progress" in soup(during).get_text()


def test_every_link_resolves_also_in_a_moved_copy(trained, tmp_path):
    out = trained["out"]
    links = linked_files(out / REPORT_FILE)
    assert links and all(path.is_file() for path in links)
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(out, moved)
    links = linked_files(moved / REPORT_FILE)
    images = [path for path in links if path.suffix in (".png", ".jpg")]
    assert len(images) >= 1 + 2 + 4 * 2  # the curves, the two photos, four steps x (sim + edit) images
    for path in links:
        assert path.resolve().is_relative_to(moved.resolve()), path  # nothing outside the folder
        with Image.open(path) as image:
            assert image.size[0] > 0
            image.verify()


@pytest.mark.slow
def test_a_resumed_runs_report_covers_the_run_once(tiny_world, subject, trained, tmp_path):
    out = tmp_path / "model_output" / "boy1"

    with pytest.raises(KeyboardInterrupt):
        train(run_config(tiny_world), subject, out, score_fn=StepScores({"boy1": SIM_FACE}), on_step=stop_at(3))
    train(run_config(tiny_world), subject, out, resume="latest", score_fn=StepScores({"boy1": SIM_FACE}))
    assert selection_table(out / REPORT_FILE) == selection_table(trained["out"] / REPORT_FILE)
    settings = {cells[0]: cells[1] for cells, _ in table_rows(out / REPORT_FILE, "settings")}
    assert settings["time per step"].endswith(" s (median, validation left out)")
    assert float(settings["time per step"].split()[0]) > 0


# --- the search report -----------------------------------------------------------------------------


@pytest.mark.slow
def test_search_report_is_the_table_with_the_winner_highlighted(tiny_world, subject, tmp_path):
    config = run_config(tiny_world, train_step=2, auto_recipe=True, auto_recipes=("base", "half_rank", "longer"),
                        auto_budget=4, auto_param_penalty=10.0)
    out = tmp_path / "model_output" / "boy1"
    curves = {"base": {1: 0.5, 2: 0.6}, "half_rank": {1: 0.65, 2: 0.55}}
    run_auto_recipe(config, subject, out, score_fn=StepScores(curves))
    work = out / AUTO_DIR
    with open(work / TABLE_FILE, newline="") as handle:
        expected = list(csv.DictReader(handle))
    rows = table_rows(work / REPORT_FILE, "recipes")
    assert [cells[0] for cells, _ in rows] == [row["recipe"] for row in expected] == ["base", "half_rank", "longer"]
    for (cells, highlighted), row in zip(rows, expected):
        assert cells[2] == row["status"] and highlighted == (row["winner"] == "True")
        if row["score"]:
            numbers = dict(zip(["best step", *METRICS, "objective", "changed parameters", "penalty", "score"],
                               cells[4:14]))
            assert int(numbers["best step"]) == int(row["best_step"])
            assert all(float(numbers[m]) == round(float(row[m]), 3) for m in METRICS)
            assert float(numbers["score"]) == round(float(row["score"]), 4)
            assert int(numbers["changed parameters"].replace(",", "")) == int(row["changed_parameters"])
    assert [cells[0] for cells, highlighted in rows if highlighted] == ["half_rank"]  # 0.684 - 0.053 > 0.668 - 0.106
    assert rows[2][0][1] == "train_step=3" and rows[2][0][2] == "over budget"
    links = linked_files(work / REPORT_FILE)
    assert {(work / name / REPORT_FILE).resolve() for name in ("base", "half_rank")} <= set(links)
    assert all(path.exists() for path in links) and (work / "frontier.png").is_file()
    assert find_training(out.parent, "boy1").report == work / REPORT_FILE  # what the score report links


# --- the score report ------------------------------------------------------------------------------


def scored_task(name: str, face: float, clip_img: float, clip_text: float) -> TaskResult:
    image = ImageScore(f"/nowhere/{name}/0-000.jpg", 0, 0, True, True,
                       {"face": face, "clip_img": clip_img, "clip_text": clip_text})
    return TaskResult(name, "/nowhere/refs", f"/nowhere/{name}", [], [PromptScore(0, "a photo", 5, [image])])


def test_score_report_links_each_subject_to_its_training(trained, tmp_path):
    out = trained["out"]
    outputs = out.parent.parent / "outputs"
    result = ScoreResult(ADVANCED, "dlib", False, {"boy1_sim": scored_task("boy1_sim", 0.41, 0.42, 0.43),
                                                   "boy1_edit": scored_task("boy1_edit", 0.31, 0.32, 0.33),
                                                   "girl1_sim": scored_task("girl1_sim", 0.1, 0.2, 0.3)})
    page = write_reports([result], outputs)["html"]
    assert page.name == REPORT_HTML
    assert (out / REPORT_FILE).resolve() in linked_files(page)  # outputs/ -> ../model_output/boy1/report.html
    rows = [cells for cells, _ in table_rows(page, "training")]
    predicted = json.loads((out / META_FILE).read_text())["selection"]["scores"]["2"]
    sim, edit = rows[0][-5:], rows[1][-5:]
    assert sim[:3] == ["validation, step 2 (test faces)", "sim"] + [f"{predicted['sim_face']:.3f}"]
    assert sim[3:] == [f"{predicted['sim_clip_img']:.3f}", ""]
    assert edit[1:] == ["edit", *(f"{predicted[m]:.3f}" for m in ("edit_face", "edit_clip_img", "edit_clip_text"))]
    assert rows[2][-5:] == ["scored here", "sim", "0.410", "0.420", "0.430"]
    assert rows[3][-5:] == ["scored here", "edit", "0.310", "0.320", "0.330"]
    assert len(rows) == 4  # girl1 has no model_output/girl1: no row


# --- the shared pieces -----------------------------------------------------------------------------


def test_links_are_relative_and_quoted_and_text_is_escaped(tmp_path):
    page = tmp_path / "a" / "page.html"
    assert rel_link(tmp_path / "b" / "x y#1.jpg", page.parent) == "../b/x%20y%231.jpg"
    assert esc("<b class='x'>") == "&lt;b class=&#x27;x&#x27;&gt;"
    html = table(["a"], [["<td>1</td>"], ["<td>2</td>"]], [False, True])
    assert "<tr class='chosen'><td>2</td>" in html and "<tr><td>1</td>" in html

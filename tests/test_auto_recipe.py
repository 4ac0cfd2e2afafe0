"""--auto_recipe on the tiny world: every candidate within the budget trained and validated, the table, the winner
by objective minus the parameter penalty copied to -o, and a search interrupted between candidates resumed
without training the finished ones again."""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import train as train_script
from entrypoints import run_entry
from libs.locks import FolderBusyError, claimed_folder
from libs.train import METRICS, Rendered, TrainingError, ValidationScores, run_auto_recipe
from libs.train.auto_recipe import plan_candidates
from libs.train.frontier import pareto_optimal
from libs.train.param_budget import planned_parameters
from libs.train_output import AUTO_DIR, FRONTIER_FILE, META_FILE, TABLE_FILE, TOKEN_FILE, UVIT_LORA_FILE

# the objective (sim_face here) of each recipe's validated steps
CURVES = {"base": {1: 0.50, 2: 0.60}, "half_rank": {1: 0.58, 2: 0.55}, "double_lr": {1: 0.62, 2: 0.40}}
PARAMETERS = {"base": 10_624, "half_rank": 5_328, "double_lr": 10_624}  # rank 4 / rank 2 U-ViT LoRA + the token row
PENALTY = 10.0  # per million parameters: base 0.106, half_rank 0.053, double_lr 0.106


class RecipeCurves:
    """An injected scorer: a known objective per (recipe, step); remembers its calls; can interrupt."""

    def __init__(self, stop_at: str | None = None):
        self.calls: list[tuple[str, int]] = []
        self.stop_at = stop_at

    def __call__(self, rendered: Rendered) -> ValidationScores:
        recipe = rendered.folder.parent.parent.name
        if recipe == self.stop_at:
            raise KeyboardInterrupt
        self.calls.append((recipe, rendered.step))
        values = {metric: 0.0 for metric in METRICS}
        values["sim_face"] = CURVES[recipe][rendered.step]
        return ValidationScores(values, "test", True)


@pytest.fixture()
def photos(tmp_path, public_photos) -> Path:
    folder = tmp_path / "train_data" / "girl1"
    folder.mkdir(parents=True)
    public_photos["grace_hopper"].save(folder / "hopper.jpg", quality=95)
    return folder


def auto_config(config):
    config.train.update(with_prior_preservation=False, train_step=2, validation_steps=1, auto_recipe=True,
                        auto_recipes=("base", "half_rank", "double_lr", "longer", "identity_levers"), auto_budget=6,
                        auto_param_penalty=PENALTY)
    return config


def test_candidates_follow_the_documented_recipes_and_the_budget(tiny_config, tmp_path):
    config = auto_config(tiny_config)
    config.train.update(auto_recipes=("base", "half_rank", "longer", "double_lr"), auto_budget=5)
    candidates = {c.recipe.name: c for c in plan_candidates(config, tmp_path)}
    assert candidates["half_rank"].changes == {"rank": 2, "alpha": 2.0}
    assert candidates["longer"].changes == {"train_step": 3} and candidates["longer"].status == "over budget"
    assert candidates["double_lr"].status == "over budget"  # 2 + 2 used, 2 more would pass 5
    assert all(not c.config.train.auto_recipe for c in candidates.values())
    config.train.update(masked_loss=True, min_snr_gamma=5.0, auto_recipes=("base", "identity_levers"))
    assert [c.status for c in plan_candidates(config, tmp_path)] == ["trained", "duplicate of base"]
    config.train.update(rank=32, alpha=32.0, auto_recipes=("low_rank", "vera", "lokr"), auto_budget=100)
    low = {c.recipe.name: c for c in plan_candidates(config, tmp_path)}
    assert low["low_rank"].changes == {"rank": 4, "alpha": 4.0}  # adapter lora is already the config's
    assert low["vera"].changes == {"adapter": "vera"} and low["lokr"].changes == {"adapter": "lokr"}
    # --auto_max_parameters: the rank-32 base is left out before training, the low-parameter recipes stay
    limit = planned_parameters(low["low_rank"].config)
    config.train.update(auto_recipes=("base", "low_rank", "vera", "text_only"), auto_max_parameters=limit)
    statuses = {c.recipe.name: c.status for c in plan_candidates(config, tmp_path)}
    assert statuses == {"base": "over parameter budget", "low_rank": "trained", "vera": "trained", "text_only": "trained"}
    assert planned_parameters(plan_candidates(config, tmp_path)[0].config) > limit
    config.train.auto_max_parameters = 0
    config.train.update(masked_loss=True, min_snr_gamma=5.0, auto_recipes=("base", "identity_levers"))
    assert [c.status for c in plan_candidates(config, tmp_path)] == ["trained", "duplicate of base"]


def test_the_search_picks_by_objective_minus_the_parameter_penalty_and_resumes(tiny_config, photos, tmp_path,
                                                                                 capsys):
    out = tmp_path / "model_output" / "girl1"
    first = RecipeCurves(stop_at="double_lr")
    with pytest.raises(KeyboardInterrupt):  # between candidates: base and half_rank are finished
        run_auto_recipe(auto_config(tiny_config), photos, out, score_fn=first)
    assert sorted(set(recipe for recipe, _ in first.calls)) == ["base", "half_rank"]
    work = out / AUTO_DIR
    finished = {name: (work / name / META_FILE).stat().st_mtime_ns for name in ("base", "half_rank")}
    assert not (out / META_FILE).exists()

    assert main_exit(tiny_config, photos, out) == 2  # an unfinished search is not restarted by accident

    second = RecipeCurves()
    rows = run_auto_recipe(auto_config(tiny_config), photos, out, resume="latest", score_fn=second)
    assert [recipe for recipe, _ in second.calls] == ["double_lr"] * 2  # finished recipes were not trained again
    assert {name: (work / name / META_FILE).stat().st_mtime_ns for name in finished} == finished

    by_recipe = {row["recipe"]: row for row in rows}
    assert by_recipe["longer"]["status"] == "over budget" and by_recipe["identity_levers"]["status"] == "over budget"
    for name, curve in CURVES.items():
        row = by_recipe[name]
        best_step = max(curve, key=curve.get)
        assert (row["best_step"], row["objective"], row["changed_parameters"]) == (best_step, curve[best_step],
                                                                                  PARAMETERS[name])
        assert row["adapter"] == "lora"
        assert row["score"] == pytest.approx(curve[best_step] - PENALTY * PARAMETERS[name] / 1e6)
    # without the penalty double_lr (0.62) would win; with it half_rank does (0.58 - 0.053 > 0.62 - 0.106)
    assert [row["recipe"] for row in rows if row["winner"]] == ["half_rank"]
    with open(work / TABLE_FILE, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["recipe"] for row in table] == ["base", "half_rank", "double_lr", "longer", "identity_levers"]
    assert [row["winner"] for row in table] == ["False", "True", "False", "False", "False"]
    assert [row["changed_parameters"] for row in table[:3]] == [str(PARAMETERS[n]) for n in ("base", "half_rank", "double_lr")]
    # frontier: half_rank (5,328 at 0.58) and double_lr (10,624 at 0.62) are Pareto-optimal, base (10,624 at 0.60) is not
    assert pareto_optimal(rows) == [False, True, True, False, False]
    with Image.open(work / FRONTIER_FILE) as plot:
        assert plot.format == "PNG" and plot.size[0] >= 600
        plot.verify()

    for name in (UVIT_LORA_FILE, TOKEN_FILE):
        assert (out / name).read_bytes() == (work / "half_rank" / name).read_bytes()
        assert not (work / "base" / name).exists() and not (work / "double_lr" / name).exists()  # losers' adapters go
    meta = json.loads((out / META_FILE).read_text())
    assert meta["auto_recipe"]["winner"] == "half_rank" and meta["uvit_lora"]["r"] == 2
    assert meta["selection"]["chosen_step"] == 1 and len(meta["auto_recipe"]["table"]) == 5

    assert run_auto_recipe(auto_config(tiny_config), photos, out, resume="latest", score_fn=RecipeCurves()) is None
    capsys.readouterr()
    assert main_exit(tiny_config, photos, out, "--resume", "latest") == 0  # what train.sh's re-run passes
    assert "already holds a finished personalization: nothing to resume" in capsys.readouterr().out


def test_auto_recipe_needs_validation_and_a_budget(tiny_config, photos, tmp_path):
    config = auto_config(tiny_config)
    config.train.validation_steps = 0
    with pytest.raises(TrainingError, match="validation_steps must be > 0"):
        run_auto_recipe(config, photos, tmp_path / "out")
    config.train.update(validation_steps=1, auto_budget=1)
    with pytest.raises(TrainingError, match="raise --auto_budget"):
        run_auto_recipe(config, photos, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_second_search_on_the_same_folder_stops_at_once(tiny_config, photos, tmp_path):
    """-o is the search's alone: while another run holds it, a search writes nothing there."""
    out = tmp_path / "out"
    with claimed_folder(out, "train.py"):
        with pytest.raises(FolderBusyError, match=f"{out} is in use by another run: train.py pid {os.getpid()}"):
            run_auto_recipe(auto_config(tiny_config), photos, out, score_fn=RecipeCurves())
        assert [p.name for p in out.iterdir()] == [".lock"]


def main_exit(config, photos: Path, out: Path, *extra: str) -> int:
    config_file = out.parent / "config.py"
    config_file.write_text("from libs.config import load_config\n\n\ndef get_config():\n"
                           "    config = load_config('tiny')\n"
                           f"    config.paths.update({config.paths.to_dict()!r})\n    return config\n")
    return run_entry(train_script, ["--config", config_file, "-d", photos, "-o", out, "--auto_recipe",
                                    "--no_prior_preservation", "--train_step", "2", "--validation_steps", "1",
                                    "--auto_budget", "6", *extra])


@pytest.mark.parametrize("devices, message", [("gpu7", r"device list 'gpu7': unknown device 'gpu7'"),
                                              ("cuda:0", r"no usable CUDA GPU")])
def test_an_unknown_device_is_refused_before_anything_is_written(tiny_config, photos, tmp_path, capsys, devices,
                                                                 message):
    if devices == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    code = main_exit(tiny_config, photos, out, "--auto_devices", devices)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and re.search(message, lines[0]) and "Traceback" not in err, err
    assert not out.exists() or [p.name for p in out.iterdir()] in ([], [".lock"])
